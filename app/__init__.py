"""Flywheel's web service: HTTP, HTML and the database around the models in `ml/`."""

"""The web process: the app factory, dependencies, middleware, error pages, templates and the routes."""

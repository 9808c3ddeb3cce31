"""The served model inside each web process: kept in step with the database, streamed into answers, sampled for
annotation tasks."""

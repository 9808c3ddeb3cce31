"""Logic that routes and the CLI share. Keyword-only functions over a Session; they never commit (callers do)."""

"""Routers: `api/` (REST under /api/v1, one module per resource), `pages/` (HTML, one module per audience),
`openai.py` (/v1, for OpenAI clients)."""

"""Text that goes into the database: NUL characters are dropped (PostgreSQL refuses them in text columns, and a
model or a person can produce them), so that the same input behaves the same on SQLite and PostgreSQL."""


def clean(text: str) -> str:
    return text.replace("\x00", "")


def clean_optional(text: str | None) -> str | None:
    return None if text is None else clean(text)

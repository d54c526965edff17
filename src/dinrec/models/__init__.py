"""dinrec.models."""

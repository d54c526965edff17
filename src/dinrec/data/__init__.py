"""dinrec.data."""

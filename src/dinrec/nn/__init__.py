"""dinrec.nn."""

"""dinrec.train."""

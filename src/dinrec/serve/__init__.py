"""dinrec.serve."""

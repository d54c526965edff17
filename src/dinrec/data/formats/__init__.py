"""dinrec.data.formats."""

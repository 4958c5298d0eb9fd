"""The store: every table upsertflow keeps in PostgreSQL, and the queries over them.

Routes, activities and the janitor call these functions; none of them builds SQL.
"""

"""The dashboard owns no tables: memberships and roles live in accounts."""

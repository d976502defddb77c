"""The served product."""

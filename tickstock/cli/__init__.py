"""The installed commands besides the daemon."""

"""Connections to Redis that reconnect by themselves, held by the parts that need them."""

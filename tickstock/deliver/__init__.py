"""From the history to the sockets: subscriptions, fan-out, live ticks, catch-up, overload."""

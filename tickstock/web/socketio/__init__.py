"""Socket.IO (Engine.IO v4, Socket.IO v5) at /socket.io/, beside /ws (docs/socketio.md)."""

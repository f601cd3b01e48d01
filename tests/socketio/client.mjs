// The official socket.io-client, driven one JSON command a line on stdin, for
// tests/test_socketio_clients.py. Every command gets one JSON line on stdout,
// in order; the first line is {"ready": true}. Commands name their socket:
//   {"cmd": "connect", "name", "url", "auth", "transports"?}
//       -> {"connected": true, ...state} or {"error": message, "data"}
//   {"cmd": "emit", "name", "event", "args"?, "ack"?} -> {"ack": [...]} or {"sent": true}
//   {"cmd": "events", "name"}  -> {"events": [[event, ...args], ...]}: all received
//       so far, connection events as "$connect", "$connect_error" and "$disconnect",
//       the Engine.IO transport opened and upgraded to as "$open" and "$upgrade"
//   {"cmd": "state", "name"}   -> {"connected", "id", "recovered", "transport", "pid", "offset"}
//   {"cmd": "cut", "name"}     -> {"reason"}: the engine closed from this side, no reconnection
//   {"cmd": "reconnect", "name"} -> as connect, on the same socket
// When stdin ends, every socket disconnects and the process exits.
import { createInterface } from "node:readline";
import { io } from "socket.io-client";

const TIMEOUT = 15_000;
const sockets = new Map();

function state(socket) {
  return {
    connected: socket.connected,
    id: socket.id ?? null,
    recovered: socket.recovered,
    transport: socket.io.engine?.transport?.name ?? null,
    // What the client sends back to recover (Socket.prototype._sendConnectPacket).
    pid: socket._pid ?? null,
    offset: socket._lastOffset ?? null,
  };
}

function connected(socket) {
  return new Promise((resolve) => {
    const done = (answer) => {
      clearTimeout(timer);
      socket.off("connect", ok).off("connect_error", refused);
      resolve(answer);
    };
    const ok = () => done({ connected: true, ...state(socket) });
    const refused = (err) => done({ error: err.message, data: err.data ?? null });
    const timer = setTimeout(() => done({ error: "timed out connecting" }), TIMEOUT);
    socket.on("connect", ok).on("connect_error", refused);
  });
}

const commands = {
  async connect({ name, url, auth, transports }) {
    const options = { auth, forceNew: true, autoConnect: false };
    if (transports) options.transports = transports;
    const socket = io(url, options);
    const events = [];
    socket.onAny((event, ...args) => events.push([event, ...args]));
    socket.on("connect", () => events.push(["$connect"]));
    socket.on("connect_error", (err) => events.push(["$connect_error", err.message]));
    socket.on("disconnect", (reason) => events.push(["$disconnect", reason]));
    socket.io.on("open", () => {
      const engine = socket.io.engine;
      events.push(["$open", engine.transport.name]);
      engine.on("upgrade", (transport) => events.push(["$upgrade", transport.name]));
    });
    sockets.set(name, { socket, events });
    const answer = connected(socket);
    socket.connect();
    return answer;
  },
  async emit({ name, event, args = [], ack }) {
    const { socket } = sockets.get(name);
    if (!ack) {
      socket.emit(event, ...args);
      return { sent: true };
    }
    return { ack: await socket.timeout(TIMEOUT).emitWithAck(event, ...args) };
  },
  events: async ({ name }) => ({ events: sockets.get(name).events }),
  state: async ({ name }) => state(sockets.get(name).socket),
  async cut({ name }) {
    const { socket } = sockets.get(name);
    const gone = new Promise((resolve) => socket.once("disconnect", resolve));
    socket.io.reconnection(false);
    socket.io.engine.close();
    return { reason: await gone };
  },
  async reconnect({ name }) {
    const { socket } = sockets.get(name);
    const answer = connected(socket);
    socket.connect();
    return answer;
  },
};

function say(answer) {
  process.stdout.write(JSON.stringify(answer) + "\n");
}

say({ ready: true });
const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const command = JSON.parse(line);
  try {
    say(await commands[command.cmd](command));
  } catch (error) {
    say({ failed: String(error) });
  }
}
for (const { socket } of sockets.values()) socket.disconnect();

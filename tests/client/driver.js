// A line-oriented driver around the official socket.io-client, for natter's
// end-to-end tests. Commands arrive as JSON lines on stdin; everything the
// sockets see leaves as JSON lines on stdout.
//
//   {"op":"connect","id":"s1","url":"http://127.0.0.1:5000/","auth":{"token":"…","cursor":12}}
//   {"op":"emit","id":"s1","event":"typing","data":{…},"ack":true,"tag":7}
//   {"op":"disconnect","id":"s1"}
//
// out: {"id":"s1","type":"connect"} | {"id":"s1","type":"connect_error","message":"…"}
//      {"id":"s1","type":"event","event":"newMessage","data":{…}}
//      {"id":"s1","type":"ack","tag":7,"data":…} | {"id":"s1","type":"disconnect","reason":"…"}
const { io } = require("socket.io-client");
const readline = require("readline");

const sockets = new Map();
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

function connect(cmd) {
  const socket = io(cmd.url, {
    auth: cmd.auth || {},
    forceNew: true,
    reconnection: false,
    transports: cmd.transports || ["websocket"],
    timeout: 25000,
  });
  sockets.set(cmd.id, socket);
  socket.on("connect", () => out({ id: cmd.id, type: "connect" }));
  socket.on("connect_error", (err) => out({ id: cmd.id, type: "connect_error", message: err.message }));
  socket.on("disconnect", (reason) => out({ id: cmd.id, type: "disconnect", reason }));
  socket.onAny((event, data) => out({ id: cmd.id, type: "event", event, data }));
}

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  if (!line.trim()) return;
  const cmd = JSON.parse(line);
  const socket = sockets.get(cmd.id);
  switch (cmd.op) {
    case "connect":
      connect(cmd);
      break;
    case "emit":
      if (cmd.ack) {
        socket.timeout(25000).emit(cmd.event, cmd.data, (err, resp) =>
          out({ id: cmd.id, type: "ack", tag: cmd.tag, error: err ? String(err) : null, data: resp }));
      } else {
        socket.emit(cmd.event, cmd.data);
      }
      break;
    case "disconnect":
      socket.disconnect();
      break;
    default:
      out({ type: "driver_error", message: "unknown op " + cmd.op });
  }
});
rl.on("close", () => process.exit(0));

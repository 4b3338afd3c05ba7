// A browser front end on another origin than natter, in headless Chromium
// (Debian's /usr/bin/chromium, driven by playwright-core), for the CORS
// test (tests/api/cross_origin.rs).
//
// 1. Serves a page on two origins of its own: one natter allows, one it
//    does not. Prints {"allowed": "http://127.0.0.1:P1", "foreign": "…P2"}.
// 2. Reads one JSON line: {"natter": "http://127.0.0.1:N", "peer": "<id>",
//    "email": "…", "screenshot": "<path>"}.
// 3. In the allowed page: registers and logs in over fetch(), connects
//    socket.io-client over long-polling, sends to the peer over fetch().
//    Prints {"step": "sent", "me": "<id>", "data": <message>}.
// 4. Waits for a `newMessage` from the peer (the test sends it), prints
//    {"step": "received", "data": <message>}.
// 5. In the foreign page: the same login fetch() and a polling connect
//    with the valid token, which the browser must refuse to let it read. Prints {"step": "foreign", "fetch": …,
//    "socket": …}, then exits.
// Any failure prints {"error": "…"} and exits 1.
const http = require("http");
const fs = require("fs");
const path = require("path");
const readline = require("readline");
const { launch } = require("./browser");

const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const client = fs.readFileSync(path.join(__dirname, "node_modules/socket.io-client/dist/socket.io.min.js"));
const page = `<!doctype html><html lang="en"><head><meta charset="utf-8"><title>natter cross-origin test</title>
<script src="/socket.io.min.js"></script></head><body><h1>natter from another origin</h1><pre id="log"></pre></body></html>`;

function serve() {
  return new Promise((resolve) => {
    const server = http.createServer((req, res) => {
      if (req.url === "/socket.io.min.js") {
        res.writeHead(200, { "content-type": "application/javascript" });
        res.end(client);
      } else {
        res.writeHead(200, { "content-type": "text/html; charset=utf-8" });
        res.end(page);
      }
    });
    server.listen(0, "127.0.0.1", () => resolve(server));
  });
}

async function main() {
  const [allowed, foreign] = [await serve(), await serve()];
  const origin = (s) => `http://127.0.0.1:${s.address().port}`;
  out({ allowed: origin(allowed), foreign: origin(foreign) });
  const lines = readline.createInterface({ input: process.stdin })[Symbol.asyncIterator]();
  const cfg = JSON.parse((await lines.next()).value);

  const browser = await launch();
  try {
    const tab = await browser.newPage();
    await tab.goto(origin(allowed));
    const sent = await tab.evaluate(async ({ natter, peer, email }) => {
      const log = (line) => (document.getElementById("log").textContent += line + "\n");
      const call = async (method, route, body, token) => {
        const headers = { "content-type": "application/json" };
        if (token) headers.authorization = `Bearer ${token}`;
        const res = await fetch(natter + route, { method, headers, body: JSON.stringify(body) });
        const json = await res.json();
        log(`${method} ${route} → ${res.status}`);
        if (!res.ok) throw new Error(`${method} ${route}: ${res.status} ${JSON.stringify(json)}`);
        return json;
      };
      await call("POST", "/api/auth/register", { name: "Browser Amy", email, password: "password123" });
      const { token, user } = await call("POST", "/api/auth/login", { email, password: "password123" });
      window.received = [];
      window.socket = io(natter, { auth: { token }, transports: ["polling"], reconnection: false });
      window.socket.on("newMessage", (m) => window.received.push(m));
      await new Promise((resolve, reject) => {
        window.socket.on("connect", resolve);
        window.socket.on("connect_error", (e) => reject(new Error("socket: " + e.message)));
      });
      log("socket connected over long-polling");
      const reply = await call("POST", `/api/messages/${peer}`, { message: "hello from another origin", clientMsgId: "browser-1" }, token);
      return { me: user._id, token, data: reply.data };
    }, cfg);
    out({ step: "sent", me: sent.me, data: sent.data });

    // (the page's own message comes back too: natter pushes a send to every
    // socket of both sides)
    await tab.waitForFunction((peer) => window.received.some((m) => m.senderId === peer), cfg.peer, { timeout: 30000 });
    const received = await tab.evaluate((peer) => {
      const m = window.received.find((m) => m.senderId === peer);
      document.getElementById("log").textContent += `received: ${m.message}\n`;
      return m;
    }, cfg.peer);
    if (cfg.screenshot) await tab.screenshot({ path: cfg.screenshot });
    out({ step: "received", data: received });

    const stranger = await browser.newPage();
    await stranger.goto(origin(foreign));
    const refused = await stranger.evaluate(async ({ natter, email, token }) => {
      const result = {};
      // natter is reachable from this page (an opaque answer the page may not read)...
      const opaque = await fetch(natter + "/healthz", { mode: "no-cors" });
      result.reachable = opaque.type;
      // ...but the browser lets it read nothing.
      try {
        const res = await fetch(natter + "/api/auth/login", {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ email, password: "password123" }),
        });
        result.fetch = `read ${res.status}`;
      } catch (e) {
        result.fetch = `refused: ${e.name}: ${e.message}`;
      }
      result.socket = await new Promise((resolve) => {
        const s = io(natter, { auth: { token }, transports: ["polling"], reconnection: false, timeout: 10000 });
        s.on("connect", () => resolve("connected"));
        s.on("connect_error", (e) => resolve(`refused: ${e.message}`));
      });
      return result;
    }, { ...cfg, token: sent.token });
    out({ step: "foreign", ...refused });
  } finally {
    await browser.close();
    allowed.close();
    foreign.close();
  }
}

main().then(
  () => process.exit(0),
  (e) => {
    out({ error: String(e && e.stack ? e.stack : e) });
    process.exit(1);
  },
);

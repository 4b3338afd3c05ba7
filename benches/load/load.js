// natter's load tool: drives running natter nodes over REST and the official
// socket.io-client and reports delivery latency and CPU per message.
// Reports figures; never fails on a timing. Usually started by
// benches/load/run.sh, which starts the nodes and passes their pids.
//
//   node benches/load/load.js --nodes http://127.0.0.1:5101,http://127.0.0.1:5102 \
//        --pids natter=123,natter=124,nats=99,redis=98,mongo=97 \
//        [--scenarios dm,room100,room1000,room10000,mixed,joinstorm,overload,idle5000] [--secs 10] [--rate 200] [--users 100]
//
// Scenarios:
//   dm        U users, one socket each (spread over the nodes), random direct
//             messages at R/s for T s: latency from the send to the
//             receiver's `newMessage`.
//   roomN     a room of N members (users of an external issuer, tokens
//             minted with the nodes' secret, joined over REST), 20 of them listening
//             on /chat across the nodes, a message every 100 ms for T s:
//             latency from the send to each listener's `message`.
//   joinstorm 20 members listen in a room, 980 more join in a burst, then
//             one message: how long until every listener has it.
//   mixed     dm and room1000 at once: what a busy room does to DMs.
//   overload  the dm scenario at twice --rate, sends never retried: how many
//             are answered 200 and how many shed (429/503 with Retry-After),
//             whether every accepted one is delivered, and each natter node's
//             RSS before, at its peak, and 10 s after the burst.
//   idleN     N sockets on `/` (users of an external issuer), spread over the
//             nodes, left idle: each natter node's RSS (VmRSS, /proc/<pid>/status)
//             before and 3 s after, per socket it holds.
//
// Latency is measured on this machine's clock (sender and receivers are
// this process). CPU is read from /proc/<pid>/stat (utime + stime) around
// each sending phase.
const { io } = require("socket.io-client");
const crypto = require("crypto");
const fs = require("fs");

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith("--") ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const nodes = (args.nodes || "http://127.0.0.1:5000").split(",");
const pids = (args.pids || "").split(",").filter(Boolean).map((kv) => kv.split("="));
const scenarios = (args.scenarios || "dm,room100,room1000,mixed,joinstorm").split(",");
const secs = Number(args.secs || 10);
const rate = Number(args.rate || 200);
const userCount = Number(args.users || 100);
const run = Math.random().toString(36).slice(2, 8);
const TICK = 100; // clock ticks per second on Linux

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const node = (i) => nodes[i % nodes.length];

async function api(base, method, path, token, body) {
  for (let attempt = 0; ; attempt++) {
    const res = await fetch(base + path, {
      method,
      headers: { "content-type": "application/json", ...(token ? { authorization: `Bearer ${token}` } : {}) },
      body: body ? JSON.stringify(body) : undefined,
    });
    if ((res.status === 429 || res.status === 503) && attempt < 20) {
      await sleep(200);
      continue;
    }
    const json = await res.json().catch(() => ({}));
    if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${JSON.stringify(json)}`);
    return json;
  }
}

/// Runs `f` over `items` with at most `n` at once.
async function pool(items, n, f) {
  const out = new Array(items.length);
  let next = 0;
  await Promise.all(Array.from({ length: Math.min(n, items.length) }, async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await f(items[i], i);
    }
  }));
  return out;
}

async function register(n, tag) {
  return pool(Array.from({ length: n }, (_, i) => i), 8, async (i) => {
    const email = `${tag}-${i}-${run}@load.test`;
    await api(node(i), "POST", "/api/auth/register", null, { name: `${tag}${i}`, email, password: "load-password" });
    const r = await api(node(i), "POST", "/api/auth/login", null, { email, password: "load-password" });
    return { id: r.user._id, token: r.token, i };
  });
}

/// Users of an external issuer (natter accepts tokens signed with its
/// secret for accounts it does not hold): tokens minted here, so a room of
/// 10,000 members needs no 10,000 argon2 registrations.
function mint(n, tag) {
  const secret = process.env.NATTER_JWT_SECRET;
  if (!secret) throw new Error("NATTER_JWT_SECRET must be set (run.sh sets it)");
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  return Array.from({ length: n }, (_, i) => {
    const id = `${tag}${run}x${i}`;
    const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub: id, iat: now, exp: now + 86400, iss: "natter", aud: "natter" })}`;
    const sig = crypto.createHmac("sha256", secret).update(body).digest("base64url");
    return { id, token: `${body}.${sig}`, i };
  });
}

function connect(url, token) {
  return new Promise((resolve, reject) => {
    const s = io(url, { auth: { token }, forceNew: true, reconnection: false, transports: ["websocket"], timeout: 30000 });
    s.once("connect", () => resolve(s));
    s.once("connect_error", (e) => reject(new Error(e.message)));
  });
}

function cpuTicks() {
  return pids.map(([name, pid]) => {
    try {
      const stat = fs.readFileSync(`/proc/${pid}/stat`, "utf8");
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      return [name, Number(fields[11]) + Number(fields[12])];
    } catch {
      return [name, NaN];
    }
  });
}

/// Resident memory of each natter node, KiB.
function natterRss() {
  return pids
    .filter(([name]) => name === "natter")
    .map(([, pid]) => {
      try {
        return Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${pid}/status`, "utf8"))[1]);
      } catch {
        return NaN; // the node is gone: report it, keep the run
      }
    });
}

async function idle(count) {
  const users = mint(count, "idle");
  const before = natterRss();
  const started = Date.now();
  const sockets = await pool(users, 50, (u, i) => connect(node(i), u.token));
  const opened = ((Date.now() - started) / 1000).toFixed(1);
  await sleep(3000);
  const after = natterRss();
  const perNode = Math.ceil(count / nodes.length);
  const per = after.map((a, i) => `${((a - before[i]) / perNode).toFixed(1)} KiB (${(before[i] / 1024).toFixed(0)} → ${(a / 1024).toFixed(0)} MB)`);
  console.error(`[load] ${count} idle sockets opened in ${opened} s; natter RSS per socket: ${per.join(", ")}`);
  rows.push({ name: `${count} idle sockets`, n: sockets.length, expected: count, p50: "-", p99: "-", max: "-", cpu: `RSS per socket: ${per.join(", ")}`, note: "" });
  sockets.forEach((s) => s.disconnect());
  await sleep(1000);
}

function cpuPerMessage(before, after, messages) {
  const per = {};
  for (let i = 0; i < before.length; i++) {
    const [name] = before[i];
    per[name] = (per[name] || 0) + (after[i][1] - before[i][1]) / TICK;
  }
  return Object.entries(per).map(([name, s]) => `${name} ${((s * 1000) / Math.max(messages, 1)).toFixed(2)}`).join(", ");
}

function stats(xs) {
  if (!xs.length) return { n: 0, p50: NaN, p99: NaN, max: NaN };
  const s = [...xs].sort((a, b) => a - b);
  const q = (p) => s[Math.min(s.length - 1, Math.floor(p * s.length))];
  return { n: s.length, p50: q(0.5), p99: q(0.99), max: s[s.length - 1] };
}

const rows = [];
function report(name, lat, expected, cpu, note = "") {
  const st = stats(lat);
  rows.push({ name, ...st, expected, cpu, note });
  console.error(`[load] ${name}: delivered ${st.n}/${expected}, p50 ${st.p50} ms, p99 ${st.p99} ms, max ${st.max} ms; CPU ms/msg: ${cpu} ${note}`);
}

async function dmPhase(users, sockets, lat, stopAt, counter) {
  const interval = 1000 / rate;
  let due = Date.now();
  const sends = [];
  while (Date.now() < stopAt) {
    const a = users[Math.floor(Math.random() * users.length)];
    let b = users[Math.floor(Math.random() * users.length)];
    if (b === a) b = users[(a.i + 1) % users.length];
    const text = `t${Date.now()}`;
    counter.sent++;
    // Keyed, as real clients send (a retry would return the original).
    const key = `${run}-${counter.sent}`;
    sends.push(api(node(a.i), "POST", `/api/messages/${b.id}`, a.token, { message: text, clientMsgId: key }).catch((e) => counter.failed.push(e.message)));
    due += interval;
    const wait = due - Date.now();
    if (wait > 0) await sleep(wait);
  }
  await Promise.all(sends);
}

function listenDm(users, sockets, lat) {
  sockets.forEach((s, i) => {
    s.on("newMessage", (m) => {
      if (m.receiverId !== users[i].id) return; // the sender's own echo
      const t = Number(String(m.message).slice(1));
      if (t) lat.push(Date.now() - t);
    });
  });
}

async function dm() {
  const users = await register(userCount, "dm");
  const sockets = await Promise.all(users.map((u) => connect(node(u.i) + "/", u.token)));
  const lat = [];
  listenDm(users, sockets, lat);
  const counter = { sent: 0, failed: [] };
  const before = cpuTicks();
  await dmPhase(users, sockets, lat, Date.now() + secs * 1000, counter);
  await sleep(2000);
  const after = cpuTicks();
  report(`dm ${rate}/s, ${userCount} users`, lat, counter.sent, cpuPerMessage(before, after, counter.sent), counter.failed.length ? `(${counter.failed.length} sends failed)` : "");
  sockets.forEach((s) => s.disconnect());
}

/// DMs at twice the rate, never retried: what is accepted, what is shed,
/// and what the burst does to the nodes' memory.
async function overload() {
  const users = await register(userCount, "over");
  const sockets = await Promise.all(users.map((u) => connect(node(u.i) + "/", u.token)));
  const lat = [];
  listenDm(users, sockets, lat);
  const base = natterRss();
  const peak = [...base];
  const sampler = setInterval(() => natterRss().forEach((r, i) => (peak[i] = Math.max(peak[i], r))), 250);
  const codes = {};
  const sends = [];
  const interval = 1000 / (2 * rate);
  const stopAt = Date.now() + secs * 1000;
  const before = cpuTicks();
  let due = Date.now();
  let n = 0;
  while (Date.now() < stopAt) {
    const a = users[Math.floor(Math.random() * users.length)];
    let b = users[Math.floor(Math.random() * users.length)];
    if (b === a) b = users[(a.i + 1) % users.length];
    n++;
    sends.push(
      fetch(`${node(a.i)}/api/messages/${b.id}`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${a.token}` },
        body: JSON.stringify({ message: `t${Date.now()}`, clientMsgId: `${run}-over-${n}` }),
      })
        .then((r) => {
          const retry = r.headers.get("retry-after");
          const key = r.status === 200 ? "200" : `${r.status}${retry ? "+Retry-After" : ""}`;
          codes[key] = (codes[key] || 0) + 1;
          return r.arrayBuffer();
        })
        .catch(() => (codes.error = (codes.error || 0) + 1)),
    );
    due += interval;
    const wait = due - Date.now();
    if (wait > 0) await sleep(wait);
  }
  await Promise.all(sends);
  const accepted = codes["200"] || 0;
  const deadline = Date.now() + 30000;
  while (lat.length < accepted && Date.now() < deadline) await sleep(50);
  const after = cpuTicks();
  clearInterval(sampler);
  await sleep(10000);
  const settled = natterRss();
  const rss = base.map((b, i) => `${(b / 1024).toFixed(0)} → ${(peak[i] / 1024).toFixed(0)} → ${(settled[i] / 1024).toFixed(0)} MB`).join("; ");
  const answered = Object.entries(codes).map(([k, v]) => `${k}: ${v}`).join(", ");
  console.error(`[load] overload: ${n} sends (${answered}); natter RSS before → peak → 10 s after: ${rss}`);
  report(`overload: dm ${2 * rate}/s for ${secs} s (${answered})`, lat, accepted, `${cpuPerMessage(before, after, accepted)}; RSS before → peak → 10 s after: ${rss}`);
  sockets.forEach((s) => s.disconnect());
}

async function makeRoom(members, tag) {
  const users = mint(members, tag);
  const room = (await api(node(0), "POST", "/api/rooms", users[0].token, { name: `${tag}-${run}` })).room._id;
  const started = Date.now();
  await pool(users.slice(1), 32, (u) => api(node(u.i), "POST", `/api/rooms/${room}/join`, u.token));
  console.error(`[load] ${members} members joined in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  return { users, room };
}

async function listen(users, room, count, lat) {
  const listeners = users.slice(0, count);
  const sockets = await Promise.all(listeners.map((u) => connect(node(u.i) + "/chat", u.token)));
  await Promise.all(sockets.map((s) => s.timeout(30000).emitWithAck("join-room", room)));
  sockets.forEach((s) => s.on("message", (m) => {
    const t = Number(String(m.message).slice(1));
    if (t && m.roomId === room) lat.push(Date.now() - t);
  }));
  return sockets;
}

/// Sends a probe to the room and waits until every one of `listeners`
/// has it: the room's partition has worked through everything before it
/// (its joins' fan-out). Returns the seconds it took, or null.
async function settle(sender, room, lat, listeners, limitSecs = 180) {
  const t0 = Date.now();
  const n = lat.length;
  await api(node(sender.i), "POST", `/api/rooms/${room}/messages`, sender.token, { message: `t${t0}` });
  while (lat.length < n + listeners && Date.now() - t0 < limitSecs * 1000) await sleep(20);
  const took = lat.length >= n + listeners ? (Date.now() - t0) / 1000 : null;
  lat.length = n;
  console.error(`[load] room settled: ${took === null ? `not within ${limitSecs} s` : `${took.toFixed(1)} s`}`);
  return took;
}

async function roomPhase(sender, room, stopAt) {
  let sent = 0;
  while (Date.now() < stopAt) {
    api(node(sender.i), "POST", `/api/rooms/${room}/messages`, sender.token, { message: `t${Date.now()}` }).catch(() => {});
    sent++;
    await sleep(100);
  }
  return sent;
}

async function roomScenario(members) {
  const { users, room } = await makeRoom(members, `room${members}`);
  const lat = [];
  const sockets = await listen(users, room, 20, lat);
  const settled = await settle(users[0], room, lat, sockets.length);
  const before = cpuTicks();
  const sent = await roomPhase(users[0], room, Date.now() + secs * 1000);
  await sleep(2000);
  const after = cpuTicks();
  report(`room of ${members}, 20 listening`, lat, sent * 20, cpuPerMessage(before, after, sent), settled === null ? "(joins never settled)" : `(joins settled in ${settled.toFixed(1)} s)`);
  sockets.forEach((s) => s.disconnect());
}

async function joinStorm() {
  const members = 1000;
  const users = mint(members, "storm");
  const room = (await api(node(0), "POST", "/api/rooms", users[0].token, { name: `storm-${run}` })).room._id;
  const lat = [];
  const sockets = await listen(users, room, 20, lat);
  await settle(users[0], room, lat, sockets.length);
  const started = Date.now();
  await pool(users.slice(20), 32, (u) => api(node(u.i), "POST", `/api/rooms/${room}/join`, u.token));
  const joinSecs = (Date.now() - started) / 1000;
  const t0 = Date.now();
  await api(node(0), "POST", `/api/rooms/${room}/messages`, users[0].token, { message: `t${t0}` });
  const deadline = Date.now() + 180000;
  while (lat.length < 20 && Date.now() < deadline) await sleep(20);
  report(`${members - 20} joins in ${joinSecs.toFixed(1)} s, then a message, 20 listening`, lat, 20, "-", lat.length === 20 ? "" : "(not all delivered within 180 s)");
  sockets.forEach((s) => s.disconnect());
}

async function mixed() {
  const users = await register(userCount, "mix");
  const sockets = await Promise.all(users.map((u) => connect(node(u.i) + "/", u.token)));
  const dmLat = [];
  listenDm(users, sockets, dmLat);
  const { users: members, room } = await makeRoom(1000, "mixroom");
  const roomLat = [];
  const listeners = await listen(members, room, 20, roomLat);
  await settle(members[0], room, roomLat, listeners.length);
  const counter = { sent: 0, failed: [] };
  const before = cpuTicks();
  const stopAt = Date.now() + secs * 1000;
  const [, roomSent] = await Promise.all([dmPhase(users, sockets, dmLat, stopAt, counter), roomPhase(members[0], room, stopAt)]);
  await sleep(2000);
  const after = cpuTicks();
  const cpu = cpuPerMessage(before, after, counter.sent + roomSent);
  report(`mixed: dm ${rate}/s beside a busy room of 1000`, dmLat, counter.sent, cpu);
  report(`mixed: the room of 1000, 20 listening`, roomLat, roomSent * 20, cpu);
  sockets.forEach((s) => s.disconnect());
  listeners.forEach((s) => s.disconnect());
}

(async () => {
  console.error(`[load] ${nodes.length} node(s): ${nodes.join(" ")}; ${secs} s per phase`);
  for (const s of scenarios) {
    if (s === "dm") await dm();
    else if (s === "mixed") await mixed();
    else if (s === "joinstorm") await joinStorm();
    else if (s === "overload") await overload();
    else if (s.startsWith("idle")) await idle(Number(s.slice(4)));
    else if (s.startsWith("room")) await roomScenario(Number(s.slice(4)));
    else throw new Error(`unknown scenario ${s}`);
  }
  console.log("| scenario | delivered | p50 ms | p99 ms | max ms | CPU ms per message |");
  console.log("| --- | --- | --- | --- | --- | --- |");
  for (const r of rows) console.log(`| ${r.name} | ${r.n}/${r.expected} ${r.note} | ${r.p50} | ${r.p99} | ${r.max} | ${r.cpu} |`);
  console.log(`natter RSS at the end: ${natterRss().map((r) => `${(r / 1024).toFixed(0)} MB`).join(", ")}`);
  process.exit(0);
})().catch((e) => {
  console.error(e);
  process.exit(1);
});

// natter's web client: plain JavaScript, no build step, served by natter
// itself (the files are in the binary). It talks to the same REST API and
// Socket.IO namespaces as any other client:
//
// - REST for everything that changes state (sends retry with the same
//   `clientMsgId`, so a send during a blip is never doubled);
// - Socket.IO `/` for direct deliveries (`newMessage`, `messagesSeen`,
//   `typing`) and `/chat` for rooms (`message`, presence);
// - each namespace keeps the `cursor` of the last delivery it processed and
//   reconnects with it, so nothing sent while the connection was down is
//   lost or shown twice. Messages are keyed by `_id`, so a delivery that
//   also came over REST is shown once.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const SESSION = "natter.session";

  const fresh = () => ({
    token: null,
    me: null, // {_id, name, email}
    people: new Map(), // id → {_id, name}
    peopleCursor: null,
    unseen: {}, // peer id → count
    rooms: new Map(), // id → room
    open: null, // {kind: "dm" | "room", id}
    messages: new Map(), // _id → message of the open conversation
    oldestSeq: null,
    seenUpTo: 0, // the open peer has seen my messages up to this seq
    presence: new Map(), // user id → name, in the open room
    cursors: { direct: undefined, chat: undefined },
    sockets: { direct: null, chat: null },
    typingTimer: null,
    typingSentAt: 0,
    refreshTimer: null,
    listTimer: null,
    readTimer: null,
    /// The `_id`s of the last direct deliveries, in arrival order (the
    /// browser tests check that a resume repeats none), and how many
    /// `resync`s came.
    received: [],
    resyncs: 0,
  });
  let state = fresh();

  // ---------------------------------------------------------------- REST

  class ApiError extends Error {
    constructor(status, body, retryAfter) {
      super((body && body.message) || `HTTP ${status}`);
      this.status = status;
      this.code = body && body.code;
      this.retryAfter = retryAfter;
    }
  }

  async function api(method, path, body) {
    const headers = {};
    if (body !== undefined) headers["content-type"] = "application/json";
    if (state.token) headers.authorization = `Bearer ${state.token}`;
    const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const json = await res.json().catch(() => ({}));
    if (!res.ok) {
      if (res.status === 401 && state.token) logout("Your session ended: log in again.");
      throw new ApiError(res.status, json, Number(res.headers.get("retry-after")) || 0);
    }
    return json;
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  /// A call that may be repeated safely (a send with its clientMsgId):
  /// retried on network errors, 429 and 5xx, with backoff.
  async function retrying(method, path, body) {
    const session = state.token;
    for (let attempt = 0; ; attempt++) {
      if (state.token !== session) throw new Error("logged out before the message was sent");
      try {
        return await api(method, path, body);
      } catch (e) {
        const retryable = !(e instanceof ApiError) || e.status === 429 || e.status >= 500;
        if (!retryable || attempt >= 10 || state.token !== session) throw e;
        const wait = e.retryAfter ? e.retryAfter * 1000 : Math.min(8000, 250 * 2 ** attempt);
        await sleep(wait + Math.random() * 200);
      }
    }
  }

  const clientMsgId = () =>
    (crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(16).slice(2)}`).replace(/[^A-Za-z0-9_-]/g, "");

  // ------------------------------------------------------------- session

  function saveSession() {
    localStorage.setItem(SESSION, JSON.stringify({ token: state.token, me: state.me }));
  }

  function logout(why) {
    localStorage.removeItem(SESSION);
    for (const s of Object.values(state.sockets)) if (s) s.disconnect();
    clearInterval(state.listTimer);
    clearTimeout(state.refreshTimer);
    clearTimeout(state.typingTimer);
    clearTimeout(state.readTimer);
    // Nothing of this session is kept for the next: lists, cursors, timers.
    state = fresh();
    window.natter.state = state;
    $("people").replaceChildren();
    $("rooms").replaceChildren();
    $("messages").replaceChildren();
    showAuth(why || "");
  }

  function showAuth(message) {
    $("auth").hidden = false;
    $("chat").hidden = true;
    $("logout").hidden = true;
    $("whoami").hidden = true;
    $("auth-error").textContent = message;
    setConnection("offline");
  }

  async function login(email, password) {
    const r = await api("POST", "/api/auth/login", { email, password });
    state.token = r.token;
    state.me = r.user;
    saveSession();
    await start();
  }

  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("auth-error").textContent = "";
    try {
      await login($("login-email").value, $("login-password").value);
    } catch (e) {
      $("auth-error").textContent = e.message;
    }
  });

  $("register-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    $("auth-error").textContent = "";
    const [name, email, password] = [$("register-name").value, $("register-email").value, $("register-password").value];
    try {
      await api("POST", "/api/auth/register", { name, email, password });
      await login(email, password);
    } catch (e) {
      $("auth-error").textContent =
        e.status === 401 ? "Could not log in with this email and password (is the address already registered?)" : e.message;
    }
  });

  $("logout").addEventListener("click", () => logout());

  // --------------------------------------------------------- connection

  function setConnection(kind) {
    const el = $("connection");
    el.className = `conn ${kind}`;
    el.textContent = { online: "Connected", reconnecting: "Reconnecting…", offline: "Offline" }[kind];
  }

  function updateConnection() {
    const { direct, chat } = state.sockets;
    if (!direct) return setConnection("offline");
    setConnection(direct.connected && chat && chat.connected ? "online" : "reconnecting");
  }

  /// A delivery moved a namespace's cursor.
  function advance(ns, data) {
    if (data && typeof data.cursor === "number" && !(state.cursors[ns] >= data.cursor)) state.cursors[ns] = data.cursor;
  }

  function connect(ns, path) {
    const socket = io(path, {
      // Read at every (re)connection: resume from the last delivery processed.
      auth: (cb) => cb(state.cursors[ns] === undefined ? { token: state.token } : { token: state.token, cursor: state.cursors[ns] }),
      transports: ["websocket", "polling"],
      // Behind a proxy that refuses WebSocket, fall back to long-polling.
      tryAllTransports: true,
    });
    const session = state.token;
    // The client retries a dropped connection by itself, but not one the
    // server ended (too slow, a blip while joining) or refused (a cap):
    // those are retried here, after a pause.
    const later = () =>
      setTimeout(() => {
        if (state.token === session && state.sockets[ns] === socket && !socket.connected) socket.connect();
      }, 1000 + Math.random() * 2000);
    socket.on("connect", () => {
      showPaneError(null);
      updateConnection();
    });
    socket.on("disconnect", (reason) => {
      updateConnection();
      if (reason === "io server disconnect") later();
    });
    socket.on("connect_error", (err) => {
      updateConnection();
      if (/expired|not valid|authentication/.test(err.message)) return logout("Your session ended: log in again.");
      if (!socket.active) {
        showPaneError(new Error(`Real-time connection refused: ${err.message}`));
        later();
      }
    });
    socket.on("synced", (d) => advance(ns, d));
    socket.on("resync", (d) => {
      state.resyncs++;
      advance(ns, d);
      refreshLists();
      if (state.open) openConversation(state.open.kind, state.open.id);
    });
    socket.on("error", (e) => {
      if (e && e.code === "token_expired") logout("Your session ended: log in again.");
    });
    return socket;
  }

  // ----------------------------------------------------------- sidebar

  async function loadPeople(more) {
    const q = more && state.peopleCursor ? `?limit=100&after=${encodeURIComponent(state.peopleCursor)}` : "?limit=100";
    const r = await api("GET", `/api/users${q}`);
    // Merged: accounts are never deleted, and pages loaded with "More
    // people" stay when the first page is read again.
    for (const u of r.users) state.people.set(u._id, u);
    state.unseen = r.unseenMessages || {};
    if (more || !state.peopleCursor) state.peopleCursor = r.nextCursor || null;
    renderPeople();
  }

  async function loadRooms() {
    // Every page (rooms are few next to people).
    let after = null;
    for (let page = 0; page < 20; page++) {
      const r = await api("GET", `/api/rooms?limit=100${after ? `&after=${encodeURIComponent(after)}` : ""}`);
      for (const room of r.rooms) state.rooms.set(room._id, room);
      after = r.nextCursor;
      if (!after) break;
    }
    renderRooms();
  }

  function refreshLists() {
    loadPeople(false).catch(() => {});
    loadRooms().catch(() => {});
  }

  /// Counts move live at once; shortly after, the server's exact counts
  /// replace them.
  function refreshSoon() {
    clearTimeout(state.refreshTimer);
    state.refreshTimer = setTimeout(refreshLists, 600);
  }

  function listButton(label, meta, count, current, onClick) {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    const name = document.createElement("span");
    name.textContent = label;
    if (meta) {
      const m = document.createElement("span");
      m.className = "meta";
      m.textContent = ` ${meta}`;
      name.append(m);
    }
    b.append(name);
    if (count) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = String(count);
      b.append(badge, hidden(" unread"));
    }
    if (current) b.setAttribute("aria-current", "true");
    b.addEventListener("click", onClick);
    li.append(b);
    return li;
  }

  function renderPeople() {
    const ul = $("people");
    ul.replaceChildren();
    const people = [...state.people.values()].sort((a, b) => a.name.localeCompare(b.name));
    for (const u of people) {
      const current = state.open && state.open.kind === "dm" && state.open.id === u._id;
      const li = listButton(u.name, "", current ? 0 : state.unseen[u._id] || 0, current, () => openConversation("dm", u._id).catch(showPaneError));
      li.dataset.peer = u._id;
      ul.append(li);
    }
    $("more-people").hidden = !state.peopleCursor;
  }

  function renderRooms() {
    const ul = $("rooms");
    ul.replaceChildren();
    const rooms = [...state.rooms.values()].sort((a, b) => a.name.localeCompare(b.name));
    for (const r of rooms) {
      const current = state.open && state.open.kind === "room" && state.open.id === r._id;
      const meta = r.isMember ? (r.activeUsers ? `· ${r.activeUsers} here` : "") : "· join";
      const li = listButton(r.name, meta, r.isMember && !current ? r.unread || 0 : 0, current, () => openConversation("room", r._id).catch(showPaneError));
      li.dataset.room = r._id;
      ul.append(li);
    }
  }

  $("more-people").addEventListener("click", () => loadPeople(true).catch(showPaneError));

  $("room-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const name = $("room-name").value.trim();
    if (!name) return;
    try {
      const r = await api("POST", "/api/rooms", { name });
      $("room-name").value = "";
      state.rooms.set(r.room._id, { ...r.room, isMember: true });
      renderRooms();
      await openConversation("room", r.room._id);
    } catch (e) {
      showPaneError(e);
    }
  });

  // ------------------------------------------------------ conversation

  function showPaneError(e) {
    $("pane-error").textContent = e ? e.message || String(e) : "";
  }

  function nameOf(id) {
    if (state.me && id === state.me._id) return "You";
    const u = state.people.get(id) || (state.presence.has(id) ? { name: state.presence.get(id) } : null);
    return u ? u.name : "Someone";
  }

  async function closeOpen() {
    const open = state.open;
    if (open && open.kind === "room" && state.sockets.chat) state.sockets.chat.emit("leave-room", open.id);
    state.open = null;
  }

  async function openConversation(kind, id) {
    showPaneError(null);
    if (!state.open || state.open.kind !== kind || state.open.id !== id) await closeOpen();
    state.open = { kind, id };
    state.messages.clear();
    state.oldestSeq = null;
    state.seenUpTo = 0;
    state.presence.clear();
    $("chat").classList.add("in-conversation");
    $("messages").replaceChildren();
    $("typing").textContent = "";
    $("presence").hidden = kind !== "room";
    $("presence").textContent = "";
    if (kind === "dm") {
      $("pane-title").textContent = (state.people.get(id) || { name: "Conversation" }).name;
      $("leave-room").hidden = true;
      $("send-form").hidden = false;
      renderPeople();
      renderRooms();
      await loadHistory(false);
      state.unseen[id] = 0;
      renderPeople();
    } else {
      let room = state.rooms.get(id);
      $("pane-title").textContent = room ? room.name : "Room";
      if (room && !room.isMember) {
        const r = await api("POST", `/api/rooms/${encodeURIComponent(id)}/join`);
        room = { ...room, ...r.room, isMember: true };
        state.rooms.set(id, room);
      }
      $("leave-room").hidden = false;
      $("send-form").hidden = false;
      renderPeople();
      renderRooms();
      enterRoom(id);
      await loadHistory(false);
      if (room) room.unread = 0;
      renderRooms();
    }
    $("send-text").focus();
  }

  /// Enters the open room's presence on the `/chat` socket (again after
  /// every reconnection: presence is per socket).
  function enterRoom(id) {
    const chat = state.sockets.chat;
    if (!chat || !chat.connected) return;
    // The socket gets `room-users` (who is present, with names) before the ack.
    chat.emit("join-room", id, (ack) => {
      if (ack && !ack.success && state.open && state.open.id === id) showPaneError(ack);
    });
  }

  function setPresence(users) {
    state.presence.clear();
    for (const u of users) state.presence.set(u._id, u.name);
    renderPresence();
  }

  function renderPresence() {
    const names = [...state.presence.values()].sort();
    $("presence").textContent = names.length ? `Here now: ${names.join(", ")}` : "Nobody else is here";
  }

  async function loadHistory(older) {
    const { kind, id } = state.open;
    const base = kind === "dm" ? `/api/messages/${encodeURIComponent(id)}` : `/api/rooms/${encodeURIComponent(id)}/messages`;
    const q = older && state.oldestSeq ? `?limit=50&before=${state.oldestSeq}` : "?limit=50";
    const list = await api("GET", base + q);
    if (!state.open || state.open.id !== id) return;
    for (const m of list) addMessage(m);
    $("older").hidden = !(list.length === 50 && state.oldestSeq > 1);
  }

  $("older").addEventListener("click", () => loadHistory(true).catch(showPaneError));

  /// Shows a message once (keyed by `_id`; a pending one by its clientMsgId).
  function addMessage(m) {
    if (state.messages.has(m._id)) return;
    state.messages.set(m._id, m);
    if (m.seen && state.me && m.senderId === state.me._id) state.seenUpTo = Math.max(state.seenUpTo, m.seq);
    if (state.oldestSeq === null || m.seq < state.oldestSeq) state.oldestSeq = m.seq;
    const ol = $("messages");
    const pending = m.clientMsgId && ol.querySelector(`li[data-pending="${CSS.escape(m.clientMsgId)}"]`);
    const li = renderMessage(m);
    if (pending) {
      pending.replaceWith(li);
      return;
    }
    // In seq order (older pages arrive after newer ones); pending sends stay last.
    const next = [...ol.children].find((el) => !el.dataset.seq || Number(el.dataset.seq) > m.seq);
    ol.insertBefore(li, next || null);
    if (!next) li.scrollIntoView({ block: "nearest" });
  }

  function renderMessage(m) {
    const li = document.createElement("li");
    const mine = state.me && m.senderId === state.me._id;
    li.className = mine ? "mine" : "theirs";
    li.dataset.id = m._id;
    li.dataset.seq = String(m.seq);
    if (state.open && state.open.kind === "room") {
      const who = document.createElement("span");
      who.className = "who";
      who.textContent = nameOf(m.senderId);
      li.append(who);
    }
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = m.message || "";
    li.append(text);
    if (m.attachment) {
      const a = document.createElement("a");
      a.href = m.attachment;
      a.textContent = m.message ? " (attachment)" : "Attachment";
      a.rel = "noopener noreferrer nofollow";
      a.target = "_blank";
      li.append(a);
    }
    const when = document.createElement("time");
    when.className = "when";
    when.dateTime = m.createdAt;
    when.textContent = new Date(m.createdAt).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    li.append(when);
    if (mine && state.open && state.open.kind === "dm") li.append(tick(m.seq <= state.seenUpTo || m.seen ? "seen" : "sent"));
    return li;
  }

  function tick(kind) {
    const t = document.createElement("span");
    t.className = `tick ${kind}`;
    t.dataset.tick = kind;
    const says = { pending: "sending", sent: "sent", seen: "seen", failed: "not sent" }[kind];
    const mark = document.createElement("span");
    mark.setAttribute("aria-hidden", "true");
    mark.textContent = { pending: "🕓", sent: "✓", seen: "✓✓", failed: "!" }[kind];
    t.title = says;
    t.append(mark, hidden(says));
    return t;
  }

  /// Text for screen readers only.
  function hidden(text) {
    const span = document.createElement("span");
    span.className = "visually-hidden";
    span.textContent = text;
    return span;
  }

  function markSeenUpTo(seq) {
    state.seenUpTo = Math.max(state.seenUpTo, seq);
    for (const li of $("messages").querySelectorAll("li.mine[data-seq]")) {
      const t = li.querySelector(".tick");
      if (t && Number(li.dataset.seq) <= state.seenUpTo && t.dataset.tick !== "seen") t.replaceWith(tick("seen"));
    }
  }

  $("send-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const input = $("send-text");
    const text = input.value.trim();
    if (!text || !state.open) return;
    input.value = "";
    const { kind, id } = state.open;
    const key = clientMsgId();
    // Shown at once, confirmed when the server answers (or its delivery comes).
    const li = document.createElement("li");
    li.className = "mine";
    li.dataset.pending = key;
    const span = document.createElement("span");
    span.className = "text";
    span.textContent = text;
    li.append(span, tick("pending"));
    $("messages").append(li);
    li.scrollIntoView({ block: "nearest" });
    sendTyping(false);
    const path = kind === "dm" ? `/api/messages/${encodeURIComponent(id)}` : `/api/rooms/${encodeURIComponent(id)}/messages`;
    try {
      const r = await retrying("POST", path, { message: text, clientMsgId: key });
      if (state.open && state.open.id === id) addMessage(r.data);
    } catch (e) {
      const t = li.querySelector(".tick");
      if (t) t.replaceWith(tick("failed"));
      showPaneError(e);
    }
  });

  // Typing notices, at most one every 2 s while typing.
  function sendTyping(typing) {
    if (!state.open || state.open.kind !== "dm" || !state.sockets.direct) return;
    const now = Date.now();
    if (typing && now - state.typingSentAt < 2000) return;
    state.typingSentAt = typing ? now : 0;
    state.sockets.direct.emit("typing", { to: state.open.id, typing });
  }
  $("send-text").addEventListener("input", () => sendTyping($("send-text").value.length > 0));

  $("leave-room").addEventListener("click", async () => {
    if (!state.open || state.open.kind !== "room") return;
    const id = state.open.id;
    try {
      await closeOpen();
      await api("POST", `/api/rooms/${encodeURIComponent(id)}/leave`);
      const room = state.rooms.get(id);
      if (room) room.isMember = false;
      showEmptyPane();
      renderRooms();
    } catch (e) {
      showPaneError(e);
    }
  });

  $("back").addEventListener("click", async () => {
    await closeOpen();
    showEmptyPane();
  });

  function showEmptyPane() {
    state.open = null;
    $("chat").classList.remove("in-conversation");
    $("pane-title").textContent = "Pick someone to talk to";
    $("messages").replaceChildren();
    $("send-form").hidden = true;
    $("leave-room").hidden = true;
    $("presence").hidden = true;
    $("older").hidden = true;
    $("typing").textContent = "";
    renderPeople();
    renderRooms();
  }

  // ------------------------------------------------------- deliveries

  function onNewMessage(m) {
    advance("direct", m);
    state.received.push(m._id);
    if (state.received.length > 500) state.received.shift();
    const me = state.me._id;
    const peer = m.senderId === me ? m.receiverId : m.senderId;
    if (state.open && state.open.kind === "dm" && state.open.id === peer) {
      addMessage(m);
      if (m.senderId === peer) {
        $("typing").textContent = "";
        if (document.visibilityState === "visible") {
          api("PATCH", `/api/messages/${encodeURIComponent(m._id)}/seen`).catch(() => {});
        } else {
          state.unseen[peer] = (state.unseen[peer] || 0) + 1;
          renderPeople();
        }
      }
      return;
    }
    if (m.senderId === peer) {
      state.unseen[peer] = (state.unseen[peer] || 0) + 1;
      if (!state.people.has(peer)) state.people.set(peer, { _id: peer, name: "New contact" });
      renderPeople();
      refreshSoon();
    }
  }

  function onMessagesSeen(s) {
    advance("direct", s);
    const me = state.me._id;
    if (s.senderId === me && state.open && state.open.kind === "dm" && state.open.id === s.readerId) markSeenUpTo(s.upToSeq);
    if (s.readerId === me) refreshSoon(); // read on another tab
  }

  function onTyping(t) {
    if (!state.open || state.open.kind !== "dm" || state.open.id !== t.from) return;
    clearTimeout(state.typingTimer);
    $("typing").textContent = t.typing ? `${nameOf(t.from)} is typing…` : "";
    if (t.typing) state.typingTimer = setTimeout(() => ($("typing").textContent = ""), 4000);
  }

  function onRoomMessage(m) {
    advance("chat", m);
    if (state.open && state.open.kind === "room" && state.open.id === m.roomId) {
      addMessage(m);
      if (m.senderId !== state.me._id && document.visibilityState === "visible") markRoomReadSoon(m.roomId);
      return;
    }
    const room = state.rooms.get(m.roomId);
    if (room && m.senderId !== state.me._id) {
      room.unread = (room.unread || 0) + 1;
      renderRooms();
    }
    refreshSoon();
  }

  /// Reading a room's newest message moves the read watermark to its end.
  function markRoomReadSoon(roomId) {
    clearTimeout(state.readTimer);
    state.readTimer = setTimeout(() => {
      api("GET", `/api/rooms/${encodeURIComponent(roomId)}/messages?limit=1`).catch(() => {});
    }, 500);
  }

  function onPresence(kind, d) {
    if (!state.open || state.open.kind !== "room" || state.open.id !== d.roomId) return;
    if (kind === "joined") state.presence.set(d.user._id, d.user.name);
    else state.presence.delete(d.user._id);
    renderPresence();
  }

  // ------------------------------------------------------------ start

  async function start() {
    $("auth").hidden = true;
    $("chat").hidden = false;
    $("logout").hidden = false;
    $("whoami").hidden = false;
    $("whoami").textContent = `Signed in as ${state.me.name}`;
    showEmptyPane();
    // Live deliveries first, then the lists: whatever arrives meanwhile is
    // in both and shown once (and the counts are re-read shortly after).
    const direct = connect("direct", "/");
    direct.on("newMessage", onNewMessage);
    direct.on("messagesSeen", onMessagesSeen);
    direct.on("typing", onTyping);
    const chat = connect("chat", "/chat");
    chat.on("message", onRoomMessage);
    chat.on("member-joined", (d) => advance("chat", d));
    chat.on("member-left", (d) => advance("chat", d));
    chat.on("room-users", (d) => state.open && state.open.id === d.roomId && setPresence(d.users));
    chat.on("user-joined", (d) => onPresence("joined", d));
    chat.on("user-left", (d) => onPresence("left", d));
    chat.on("connect", () => state.open && state.open.kind === "room" && enterRoom(state.open.id));
    state.sockets = { direct, chat };
    // New people and rooms appear without a reload.
    clearInterval(state.listTimer);
    state.listTimer = setInterval(() => state.token && refreshLists(), 30000);
    // The lists are read once both sockets deliver (`synced`): a message
    // arriving meanwhile is in the lists, the live stream, or both (shown
    // once, and the counts are re-read shortly after any delivery).
    const synced = (socket) => new Promise((resolve) => socket.once("synced", resolve));
    await Promise.race([Promise.all([synced(direct), synced(chat)]), sleep(5000)]);
    try {
      await Promise.all([loadPeople(false), loadRooms()]);
    } catch (e) {
      showPaneError(e);
    }
  }

  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible" && state.open && state.open.kind === "dm") {
      loadHistory(false).then(() => {
        state.unseen[state.open.id] = 0;
        renderPeople();
      }).catch(() => {});
    }
  });

  // For tests and the curious: the client's state and sockets.
  window.natter = { state };

  const saved = JSON.parse(localStorage.getItem(SESSION) || "null");
  if (saved && saved.token) {
    state.token = saved.token;
    state.me = saved.me;
    start();
  } else {
    showAuth("");
  }
})();

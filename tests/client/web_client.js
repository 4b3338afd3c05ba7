// natter's web client in headless Chromium (Debian's /usr/bin/chromium,
// driven by playwright-core), for tests/api/web_client.rs. Two people use
// it as people would: Amy on a desktop-sized window, Bob on a phone-sized
// one.
//
// Environment: NATTER_URL_A and NATTER_URL_B (Amy's and Bob's node: the
// same one, or two nodes of a cluster), SHOTS (a directory for screenshots).
// Prints one JSON line per step passed ({"step": "…"}), then {"done": true};
// on a failure {"error": "…", "step": "…"} and exits 1.
const path = require("path");
const { launch } = require("./browser");

const urls = { amy: process.env.NATTER_URL_A, bob: process.env.NATTER_URL_B || process.env.NATTER_URL_A };
const shots = process.env.SHOTS;
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
const WAIT = { timeout: 20000 };
let step = "start";

async function passed(name) {
  out({ step: name });
}

async function register(page, name, email, base) {
  await page.goto(base + "/");
  await page.getByLabel("Name", { exact: true }).fill(name);
  await page.getByLabel("Email", { exact: true }).nth(1).fill(email);
  await page.getByLabel("Password (8 characters or more)").fill("password123");
  await page.getByRole("button", { name: "Create account" }).click();
  await page.locator("#chat").waitFor({ state: "visible", ...WAIT });
  await connected(page);
}

const connected = (page) => page.locator("#connection.online").waitFor(WAIT);

/// The text of every message shown in the open conversation.
const shown = (page) => page.locator("#messages li .text").allTextContents();

async function countOf(page, text) {
  return (await shown(page)).filter((t) => t === text).length;
}

async function send(page, text) {
  await page.getByLabel("Message", { exact: true }).fill(text);
  await page.getByLabel("Message", { exact: true }).press("Enter");
  // Confirmed by the server: the pending line became the stored message.
  await page.locator("#messages li.mine[data-id]", { hasText: text }).waitFor(WAIT);
}

/// Drops `page`'s socket of namespace `ns` ("direct" or "chat") and keeps it
/// down while `meanwhile` runs, then lets it reconnect with its cursor.
async function dropWhile(page, ns, meanwhile) {
  await page.evaluate((ns) => {
    const manager = window.natter.state.sockets[ns].io;
    manager.reconnection(false);
    manager.engine.close();
  }, ns);
  await page.locator("#connection.reconnecting").waitFor(WAIT);
  await meanwhile();
  await page.evaluate((ns) => {
    const socket = window.natter.state.sockets[ns];
    socket.io.reconnection(true);
    socket.connect();
  }, ns);
  await connected(page);
}

async function main() {
  const browser = await launch();
  try {
    const run = Date.now().toString(36);
    const amyCtx = await browser.newContext({ viewport: { width: 1100, height: 700 } });
    const bobCtx = await browser.newContext({ viewport: { width: 390, height: 760 }, isMobile: true, hasTouch: true });
    const amy = await amyCtx.newPage();
    const bob = await bobCtx.newPage();

    step = "register and log in";
    await register(amy, "Amy", `amy-${run}@example.com`, urls.amy);
    await register(bob, "Bob", `bob-${run}@example.com`, urls.bob);
    // Amy's list was read before Bob existed; a reload keeps her session.
    await amy.reload();
    await connected(amy);
    await passed(step);

    step = "a message arrives live, with its unread count";
    await amy.locator("#people li", { hasText: "Bob" }).getByRole("button").click();
    await send(amy, "hello Bob");
    await amy.locator("#messages li.mine", { hasText: "hello Bob" }).locator('.tick[data-tick="sent"]').waitFor(WAIT);
    await bob.locator("#people li", { hasText: "Amy" }).locator(".badge", { hasText: "1" }).waitFor(WAIT);
    await passed(step);

    step = "opening the conversation turns the sender's tick to seen";
    await bob.locator("#people li", { hasText: "Amy" }).getByRole("button").click();
    await bob.locator("#messages li", { hasText: "hello Bob" }).waitFor(WAIT);
    await amy.locator("#messages li.mine", { hasText: "hello Bob" }).locator('.tick[data-tick="seen"]').waitFor(WAIT);
    await bob.locator("#people li", { hasText: "Amy" }).locator(".badge").waitFor({ state: "detached", ...WAIT });
    await passed(step);

    step = "typing shows on the other side";
    await bob.getByLabel("Message", { exact: true }).pressSequentially("wri");
    await amy.locator("#typing", { hasText: "Bob is typing" }).waitFor(WAIT);
    await bob.getByLabel("Message", { exact: true }).fill("");
    await passed(step);

    step = "a dropped connection resumes: the messages sent meanwhile, exactly once";
    await dropWhile(amy, "direct", async () => {
      await send(bob, "while you were away 1");
      await send(bob, "while you were away 2");
    });
    await amy.locator("#messages li", { hasText: "while you were away 2" }).waitFor(WAIT);
    await send(bob, "after the gap");
    await amy.locator("#messages li", { hasText: "after the gap" }).waitFor(WAIT);
    for (const text of ["while you were away 1", "while you were away 2", "after the gap"]) {
      const n = await countOf(amy, text);
      if (n !== 1) throw new Error(`"${text}" is shown ${n} times`);
    }
    // The resume itself delivered them (not a resync and a REST reload), once each.
    const { received, resyncs, shown: ids } = await amy.evaluate(() => ({
      received: window.natter.state.received,
      resyncs: window.natter.state.resyncs,
      shown: Object.fromEntries([...document.querySelectorAll("#messages li[data-id]")].map((li) => [li.querySelector(".text").textContent, li.dataset.id])),
    }));
    if (resyncs !== 0) throw new Error(`the resume fell back to a resync (${resyncs})`);
    if (new Set(received).size !== received.length) throw new Error(`a delivery came twice: ${JSON.stringify(received)}`);
    for (const text of ["while you were away 1", "while you were away 2"]) {
      if (!received.includes(ids[text])) throw new Error(`"${text}" was not delivered over the socket`);
    }
    await passed(step);
    if (shots) await amy.screenshot({ path: path.join(shots, "web-conversation.png") });

    step = "a study room shows who is present, and its messages";
    await amy.getByLabel("New room name").fill("Algebra");
    await amy.getByRole("button", { name: "Create" }).click();
    await amy.locator("#presence", { hasText: "Here now: Amy" }).waitFor(WAIT);
    await bob.getByRole("button", { name: "Back to the list" }).click();
    await bob.reload();
    await connected(bob);
    await bob.locator("#rooms li", { hasText: "Algebra" }).getByRole("button").click();
    await bob.locator("#presence", { hasText: "Here now: Amy, Bob" }).waitFor(WAIT);
    await amy.locator("#presence", { hasText: "Here now: Amy, Bob" }).waitFor(WAIT);
    await send(bob, "page 42?");
    await amy.locator("#messages li", { hasText: "page 42?" }).waitFor(WAIT);
    // The rooms' socket resumes from its own cursor too.
    await dropWhile(amy, "chat", () => send(bob, "said while you were away"));
    await amy.locator("#messages li", { hasText: "said while you were away" }).waitFor(WAIT);
    if ((await countOf(amy, "said while you were away")) !== 1) throw new Error("a room message missed during the gap is not shown once");
    if ((await amy.evaluate(() => window.natter.state.resyncs)) !== 0) throw new Error("the rooms' socket fell back to a resync");
    await bob.getByRole("button", { name: "Leave room" }).click();
    await amy.locator("#presence", { hasText: /^Here now: Amy$/ }).waitFor(WAIT);
    await passed(step);
    if (shots) {
      await amy.screenshot({ path: path.join(shots, "web-room.png") });
      await bob.screenshot({ path: path.join(shots, "web-phone.png") });
    }
    out({ done: true });
  } finally {
    await browser.close();
  }
}

main().then(
  () => process.exit(0),
  (e) => {
    out({ error: String(e && e.message ? e.message : e), step });
    process.exit(1);
  },
);

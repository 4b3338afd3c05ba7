// Headless Chromium for the browser tests: Debian's /usr/bin/chromium (or
// $CHROMIUM), driven by playwright-core, which downloads no browser. The
// flags keep Chromium off the network beyond the pages under test.
const { chromium } = require("playwright-core");

exports.launch = () =>
  chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    args: [
      "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });

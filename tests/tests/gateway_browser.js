// Drives headless Chromium for the gateway's browser test: opens the page
// given as argv[2], waits for it to set window.__result and prints that as
// JSON. Needs playwright-core on NODE_PATH and AGENTMESH_TEST_CHROMIUM.
const { chromium } = require('playwright-core');

(async () => {
  const url = process.argv[2];
  const browser = await chromium.launch({
    executablePath: process.env.AGENTMESH_TEST_CHROMIUM,
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-quic',
      '--no-first-run',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
    ],
  });
  try {
    const page = await browser.newPage();
    page.on('console', (message) => console.error('[page]', message.text()));
    page.on('pageerror', (error) => console.error('[page error]', error));
    await page.goto(url);
    await page.waitForFunction(() => window.__result !== undefined, null, { timeout: 30000 });
    const result = await page.evaluate(() => window.__result);
    console.log(JSON.stringify(result));
  } finally {
    await browser.close();
  }
})().catch((error) => {
  console.error(error);
  process.exit(1);
});

// Drives OHIF in Debian's chromium (headless) for tests/integration/test_browser.py.
//
//   node ohif.mjs '{"url": "...", "gateway": "http://127.0.0.1:N", "wait": "list"|"frames",
//                   "screenshot": "path.png", "timeout_ms": 60000}'
//
// Opens `url`, waits until the study list shows rows ("list") or a frame came back from the
// gateway ("frames"), or the timeout passes, and prints one JSON object: every response from
// the gateway (method, URL, status, and the start of JSON bodies), the page's visible text, its console errors, and whether
// the wait was met. The screenshot, when asked, is of the whole page.
import puppeteer from 'puppeteer-core';

const opts = JSON.parse(process.argv[2]);
const timeout = opts.timeout_ms ?? 60000;
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  // Loopback only: chromium's own background connections would be refused on a closed network.
  args: [
    '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
    '--enable-unsafe-swiftshader', '--use-angle=swiftshader', '--window-size=1280,900',
  ],
  defaultViewport: { width: 1280, height: 900 },
});
const out = { responses: [], console: [], met: false, text: '' };
try {
  const page = await browser.newPage();
  page.on('console', m => { if (m.type() === 'error') out.console.push(m.text().slice(0, 300)); });
  let frameSeen;
  const frameBack = new Promise(r => { frameSeen = r; });
  const bodies = [];
  page.on('response', r => {
    const url = r.url();
    if (!url.startsWith(opts.gateway)) return;
    const method = r.request().method();
    const entry = { method, url, status: r.status() };
    out.responses.push(entry);
    // Search answers are kept (their start) to show what the gateway let through.
    if (method === 'GET' && (r.headers()['content-type'] ?? '').includes('json')) {
      bodies.push(r.text().then(t => { entry.body = t.slice(0, 4000); }, () => {}));
    }
    if (method === 'GET' && /\/frames\/\d+/.test(url) && r.status() === 200) frameSeen();
  });
  await page.goto(opts.url, { waitUntil: 'domcontentloaded', timeout });
  const deadline = new Promise(r => setTimeout(() => r(false), timeout));
  if (opts.wait === 'frames') {
    out.met = await Promise.race([frameBack.then(() => true), deadline]);
    // The frame is drawn after it arrives.
    if (out.met) await new Promise(r => setTimeout(r, 3000));
  } else {
    const rows = page
      .waitForFunction(() => document.querySelectorAll('[data-cy="study-list-results"] tr, tbody tr').length > 0,
        { timeout })
      .then(() => true, () => false);
    out.met = await Promise.race([rows, deadline]);
    await new Promise(r => setTimeout(r, 1500));
  }
  if (opts.wait === 'error') {
    await new Promise(r => setTimeout(r, 5000));
  }
  out.text = await page.evaluate(() => document.body.innerText);
  await Promise.all(bodies);
  if (opts.screenshot) await page.screenshot({ path: opts.screenshot });
} finally {
  await browser.close();
}
// The wait's timer would keep the process alive until it fires.
process.stdout.write(JSON.stringify(out), () => process.exit(0));

// Loads UI workflows in the real ComfyUI frontend (headless Chromium driven by playwright-core), as a
// user who drags the file onto the canvas; prints one JSON line per file and writes, per file, the
// API prompt the frontend would send on Run (<stem>.api.json) and a screenshot (<stem>.png).
//
//   PLAYWRIGHT_CORE=/path/to/node_modules/playwright-core node load_workflow.js \
//       --url http://127.0.0.1:8188 --out-dir OUT [--chromium /usr/bin/chromium] wf1.json wf2.json ...
//
// Per file: ok, missing_types (node types the server does not know), and the layout check at the
// window size the workflows are made for (1400x900): every node, title bar included, inside the
// window and below the menu / tab strip (the first row where the canvas is the topmost element).
const fs = require("fs");
const path = require("path");
const { chromium } = require(process.env.PLAYWRIGHT_CORE || "playwright-core");

function parseArgs(argv) {
  const a = { url: "http://127.0.0.1:8188", outDir: ".", chromium: "/usr/bin/chromium", files: [] };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--url") a.url = argv[++i];
    else if (argv[i] === "--out-dir") a.outDir = argv[++i];
    else if (argv[i] === "--chromium") a.chromium = argv[++i];
    else a.files.push(argv[i]);
  }
  return a;
}

async function main() {
  const a = parseArgs(process.argv.slice(2));
  const browser = await chromium.launch({
    executablePath: a.chromium, headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
  let failed = 0;
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    await page.goto(a.url, { waitUntil: "load", timeout: 120000 });
    await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, { timeout: 120000 });
    // a new user's first start opens the template browser: close it as they would
    await page.waitForTimeout(1500);
    for (let i = 0; i < 3; i++) {
      const close = page.locator(".p-dialog-close-button, button[aria-label='Close']").first();
      if (await close.isVisible().catch(() => false)) await close.click().catch(() => {});
      else await page.keyboard.press("Escape");
      await page.waitForTimeout(300);
    }
    for (const file of a.files) {
      const stem = path.basename(file).replace(/\.json$/, "");
      const wf = JSON.parse(fs.readFileSync(file, "utf8"));
      const res = await page.evaluate(async (wf) => {
        await window.app.loadGraphData(wf);
        await new Promise((r) => setTimeout(r, 500));
        const known = window.LiteGraph.registered_node_types;
        const missing = wf.nodes.map((n) => n.type).filter((t) => !(t in known));
        const prompt = await window.app.graphToPrompt();
        // the menu / tab strip: rows from the top until the canvas is the topmost element
        const canvas = window.app.canvas.canvas;
        let top = -1;  // -1: the canvas is covered everywhere (a dialog left open)
        for (let y = 0; y < 300; y += 2) {
          const hits = document.elementsFromPoint(120, y);  // over the first tab: the strip is see-through past the tabs
          if (hits.length && hits[0] === canvas) { top = y; break; }
        }
        const ds = window.app.canvas.ds;
        const titleH = window.LiteGraph.NODE_TITLE_HEIGHT || 30;
        const outside = [];
        for (const n of window.app.graph._nodes) {
          const x0 = (n.pos[0] + ds.offset[0]) * ds.scale, x1 = (n.pos[0] + n.size[0] + ds.offset[0]) * ds.scale;
          const y0 = (n.pos[1] - titleH + ds.offset[1]) * ds.scale, y1 = (n.pos[1] + n.size[1] + ds.offset[1]) * ds.scale;
          if (x0 < 0 || y0 < top || x1 > window.innerWidth || y1 > window.innerHeight) {
            outside.push({ id: n.id, type: n.type, box: [x0, y0, x1, y1].map(Math.round) });
          }
        }
        return { missing, output: prompt.output, top, outside, scale: ds.scale };
      }, wf);
      fs.writeFileSync(path.join(a.outDir, `${stem}.api.json`), JSON.stringify(res.output, null, 2));
      await page.screenshot({ path: path.join(a.outDir, `${stem}.png`) });
      const ok = res.missing.length === 0;
      if (!ok) failed++;
      console.log(JSON.stringify({ file, ok, missing_types: res.missing, tab_strip_bottom: res.top,
                                   outside_window: res.outside, scale: res.scale }));
    }
  } finally {
    await browser.close();
  }
  process.exit(failed ? 1 : 0);
}

main().catch((e) => { console.error(e); process.exit(2); });

// A headless Chromium, driven by puppeteer-core, taking orders from a Python test on stdin:
// one JSON command a line, one JSON answer a line on stdout. Python owns everything else (the
// proxies it SIGKILLs and restarts, the relays), so the scenarios read as one test.
//
//   CHROMIUM=/usr/bin/chromium-headless-shell node browser-driver.mjs
//   {"id": 1, "op": "open", "url": "http://127.0.0.1:8765/demo/"}   -> {"id": 1, "ok": true, "value": 0}
//   ops: open {url}, goto {page, url}, reload {page}, eval {page, expr},
//        wait {page, expr, timeoutMs}, click {page, selector}, close {page}, logs {page}, quit

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

import puppeteer from "puppeteer-core";

const profile = mkdtempSync(join(tmpdir(), "mcproxy-chromium-"));
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM,
  headless: "shell",
  userDataDir: profile,
  args: [
    "--no-sandbox", // we run as root in CI; the sandbox refuses that
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    // A second name for loopback, so a page can come from a foreign origin (the Origin check).
    "--host-resolver-rules=MAP foreign.test 127.0.0.1",
  ],
});
/** @type {import("puppeteer-core").Page[]} */
const pages = [];
/** @type {string[][]} */
const logs = [];

async function run(cmd) {
  const page = pages[cmd.page];
  switch (cmd.op) {
    case "open": {
      const p = await browser.newPage();
      const n = pages.push(p) - 1;
      logs[n] = [];
      p.on("console", (m) => logs[n].push(`${m.type()}: ${m.text()}`));
      p.on("pageerror", (e) => logs[n].push(`pageerror: ${e.message}`));
      await p.goto(cmd.url);
      return n;
    }
    case "goto":
      await page.goto(cmd.url);
      return null;
    case "reload":
      await page.reload();
      return null;
    case "eval":
      return await page.evaluate(cmd.expr);
    case "wait": {
      const handle = await page.waitForFunction(cmd.expr, { timeout: cmd.timeoutMs, polling: 20 });
      return await handle.jsonValue();
    }
    case "click":
      await page.click(cmd.selector);
      return null;
    case "close":
      await page.close();
      return null;
    case "logs":
      return logs[cmd.page];
    case "quit":
      await browser.close();
      rmSync(profile, { recursive: true, force: true });
      process.exit(0);
    default:
      throw new Error(`unknown op ${cmd.op}`);
  }
}

process.stdout.write(`${JSON.stringify({ ready: true, version: await browser.version() })}\n`);
for await (const line of createInterface({ input: process.stdin })) {
  if (!line.trim()) continue;
  const cmd = JSON.parse(line);
  let answer;
  try {
    answer = { id: cmd.id, ok: true, value: (await run(cmd)) ?? null };
  } catch (error) {
    answer = { id: cmd.id, ok: false, error: String(error?.stack ?? error) };
  }
  process.stdout.write(`${JSON.stringify(answer)}\n`);
}
await browser.close();
rmSync(profile, { recursive: true, force: true });

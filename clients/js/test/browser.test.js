// The demo page in a real, headless Chromium (Debian's package, driven by playwright-core) against
// a real `tidings run` with TIDINGS_DEMO=1: it connects, subscribes, shows an event published over
// HTTP and one it publishes itself, survives a worker restart without losing one, and the
// screenshots are kept. Run: node --test clients/js/test/browser.test.js
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync } from "node:fs";
import path from "node:path";
import { test } from "node:test";

import { REPO, serviceMissing, TidingsService } from "../testkit/service.js";

const OUTPUT = path.join(REPO, ".cache", "browser-test");

/** The Chromium binary itself (Debian's /usr/bin/chromium is a shell wrapper around it), or null. */
function findChromium() {
  const candidates = [process.env.TIDINGS_CHROMIUM, "/usr/lib/chromium/chromium"];
  try {
    candidates.push(...execFileSync("dpkg", ["-L", "chromium"], { encoding: "utf8" }).split("\n").filter((f) => f.endsWith("/chromium")));
  } catch {
    // not a Debian system, or the package is not installed
  }
  return candidates.find((file) => file && existsSync(file) && !file.startsWith("/usr/share") && !file.startsWith("/etc")) ?? null;
}

async function loadPlaywright() {
  try {
    return (await import("playwright-core")).chromium;
  } catch {
    return null;
  }
}

const executablePath = findChromium();
const chromium = await loadPlaywright();
const skip = serviceMissing()
  ?? (executablePath ? null : "no chromium: apt-get install -y chromium (or set TIDINGS_CHROMIUM)")
  ?? (chromium ? null : "no playwright-core: npm ci in clients/js");

test("the demo page connects, subscribes, shows events and survives a worker restart", { skip: skip ?? false }, async () => {
  const svc = await new TidingsService({ workers: 2, env: { TIDINGS_DEMO: "1" } }).start();
  const root = process.getuid?.() === 0;
  const browser = await chromium.launch({ executablePath, args: root ? ["--no-sandbox"] : [] });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
    const pageErrors = [];
    page.on("pageerror", (err) => pageErrors.push(err.message));
    const channel = "conversation:browser";
    const token = svc.token("browser-user", { channels: ["conversation:*"], publish: ["conversation:*"] });
    await page.goto(svc.pageUrl(`/demo?token=${token}`)); // redirected to /demo/ so ./tidings.js resolves
    await page.waitForSelector('#state[data-state="connected"]', { timeout: 10_000 });

    await page.fill("#channel", channel);
    await page.click("#subscribe");
    await page.waitForSelector(`#subscriptions li[data-channel="${channel}"][data-state="subscribed"]`, { timeout: 5000 });
    const rows = () => page.$$eval(`#events tr[data-channel="${channel}"]`, (trs) => trs.map((tr) => Number(tr.dataset.offset)));

    await svc.publish(channel, "chat_message", { conversation_id: "browser", sender_id: "backend", content: "over HTTP" });
    await page.waitForSelector(`#events tr[data-channel="${channel}"][data-offset="1"]`, { timeout: 5000 });
    await page.fill("#publish-channel", channel);
    await page.click("#publish");
    await page.waitForSelector(`#events tr[data-channel="${channel}"][data-offset="2"]`, { timeout: 5000 });
    assert.match(await page.textContent("#publish-result"), /published at offset 2/);

    // A graceful restart of the page's worker: 1001, a countdown, a reconnect, the missed events.
    const connectionId = (await page.textContent("#connection-info")).split(" · ")[1];
    await page.evaluate(() => window.scrollTo(0, 0)); // the sticky header, with the countdown, in view
    process.kill(svc.workerOf(connectionId), "SIGTERM");
    // State and countdown are set in one handler: read them together, before the redial clears them.
    const countdown = await (await page.waitForFunction(() => {
      const state = document.getElementById("state").dataset.state;
      return state === "disconnected" && document.getElementById("countdown").textContent;
    }, null, { timeout: 10_000, polling: 10 })).jsonValue();
    for (let n = 3; n <= 4; n++) {
      await svc.publish(channel, "chat_message", { conversation_id: "browser", sender_id: "backend", content: `missed ${n}` });
    }
    mkdirSync(OUTPUT, { recursive: true });
    const during = path.join(OUTPUT, "demo-reconnecting.png");
    await page.screenshot({ path: during });
    await page.waitForSelector('#state[data-state="connected"]', { timeout: 15_000 });
    await svc.publish(channel, "chat_message", { conversation_id: "browser", sender_id: "backend", content: "live again" });
    await page.waitForSelector(`#events tr[data-channel="${channel}"][data-offset="5"]`, { timeout: 5000 });
    await new Promise((r) => setTimeout(r, 300)); // a duplicate would show by now
    const offsets = (await rows()).sort((a, b) => a - b);
    const log = await page.textContent("#log");
    const shot = path.join(OUTPUT, "demo.png");
    await page.evaluate(() => window.scrollTo(0, 0));
    await page.screenshot({ path: shot, fullPage: true });
    console.log(`screenshots: ${shot} (after the restart), ${during} (during it: "${countdown}")`);

    assert.deepStrictEqual(offsets, [1, 2, 3, 4, 5], "every event once, none lost across the restart");
    assert.match(log, /disconnected 1001/);
    assert.match(log, new RegExp(`subscribed ${channel} at \\d+, recovered: true`));
    assert.match(countdown, /^reconnecting in \d\.\d s$/);
    assert.deepStrictEqual(pageErrors, []);
  } finally {
    await browser.close();
    await svc.stop();
  }
});

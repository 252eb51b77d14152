// Signs in to the dashboard in a real Chromium, checks the unresolved badge,
// replays one dead letter (following its attempt history to the row the
// replay made and back) and ignores another, browses rows by filter and acts
// on a whole filter and on one row, then checks the database and the audit log.
// Env: OUTBOXD_URL, ADMIN_EMAIL, ADMIN_PASSWORD, DATABASE_URL, PSQL, SCREENSHOT_DIR.
import { chromium } from "playwright-core";
import { execFileSync } from "node:child_process";
import { mkdirSync } from "node:fs";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const base = env("OUTBOXD_URL");
const shots = env("SCREENSHOT_DIR");
mkdirSync(shots, { recursive: true });
const sql = (query) =>
  execFileSync(env("PSQL"), [env("DATABASE_URL"), "-tAc", query], { encoding: "utf8" }).trim();

const check = (ok, message) => {
  if (!ok) throw new Error(`browser test failed: ${message}`);
  console.log(`ok - ${message}`);
};

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  // A zone far from UTC shows that times are converted in the browser.
  const page = await (await browser.newContext({ timezoneId: "Asia/Tokyo" })).newPage();
  // Forms that change something ask first (data-confirm): count and accept.
  let confirmations = 0;
  let lastDialog = "";
  page.on("dialog", async (dialog) => {
    confirmations += dialog.type() === "confirm" ? 1 : 0;
    lastDialog = dialog.message();
    await dialog.accept();
  });
  // An inline script would be blocked by the page's policy: count violations.
  await page.addInitScript(() => {
    window.__cspViolations = 0;
    document.addEventListener("securitypolicyviolation", () => { window.__cspViolations += 1; });
  });
  const response = await page.goto(`${base}/apps`);
  const landed = new URL(page.url());
  check(landed.pathname === "/login" && landed.searchParams.get("next") === "/apps",
        "an anonymous visit is sent to the login page, which leads back to the page asked for");
  const headers = response.headers();
  const csp = headers["content-security-policy"] ?? "";
  check(csp.includes("frame-ancestors 'none'") && !/script-src[^;]*'unsafe-inline'/.test(csp),
        `the page forbids framing and inline scripts (${csp})`);
  check(headers["x-content-type-options"] === "nosniff" && headers["cache-control"] === "no-store"
        && (headers["referrer-policy"] ?? "") !== "", "nosniff, no-store and a referrer policy");
  const token = await page.getAttribute('input[name="csrf"]', "value");
  const cookie = (await page.context().cookies()).find((c) => c.name === "outboxd_csrf");
  check(token && cookie && cookie.value === token && cookie.httpOnly, "the sign-in form carries the CSRF cookie's token");

  await page.fill('input[name="email"]', env("ADMIN_EMAIL"));
  await page.fill('input[name="password"]', "not the password");
  await page.click('button[type="submit"]');
  check((await page.textContent("body")).includes("wrong e-mail or password"), "a wrong password is refused");
  check((await page.inputValue('input[name="email"]')) === env("ADMIN_EMAIL"), "a failed sign-in keeps the typed e-mail");

  // A sign-in form posted without the token (as another site would) signs nobody in.
  const forged = (await page.request.post(`${base}/login`, {
    form: { email: env("ADMIN_EMAIL"), password: env("ADMIN_PASSWORD") }, maxRedirects: 0,
  })).status();
  check(forged === 403, `a sign-in without the CSRF token is refused (${forged})`);

  await page.fill('input[name="email"]', env("ADMIN_EMAIL"));
  await page.fill('input[name="password"]', env("ADMIN_PASSWORD"));
  await page.click('button[type="submit"]');
  await page.waitForURL(`${base}/apps`);
  const badge = (await page.textContent('.badge[data-app="shop"]')).trim();
  const expected = sql("SELECT count(*) FROM dead_letters d JOIN apps a ON a.id = d.app_id WHERE a.slug = 'shop' AND d.resolved_at IS NULL");
  check(badge === expected && Number(badge) >= 2, `the badge shows ${badge} unresolved dead letters (database: ${expected})`);
  const processes = await page.$$eval("#processes tr[data-process]", (trs) => trs.length);
  check(processes === 1, `the instance overview lists the running process (${processes})`);
  await page.screenshot({ path: `${shots}/apps.png`, fullPage: true });

  await page.click('a[href^="/apps/shop/dead-letters"]');
  const rows = await page.$$eval("tr[data-id]", (trs) => trs.map((tr) => tr.dataset.id));
  check(rows.length >= 2, `the list shows ${rows.length} dead letters`);
  await page.screenshot({ path: `${shots}/list.png`, fullPage: true });

  const [toReplay, toIgnore] = rows;
  await page.goto(`${base}/apps/shop/dead-letters/${toReplay}`);
  check((await page.textContent("#payload")).includes('"order"'), "the detail page shows the pretty payload");
  await page.screenshot({ path: `${shots}/detail.png`, fullPage: true });
  // The replayed row keeps its attempt budget (here 1) unless told otherwise:
  // give it 1000, so it is still retrying (backoff) when the database is checked.
  await page.fill('input[name="max_attempts"]', "1000");
  await page.click("#replay");
  await page.waitForSelector("#resolution");
  check((await page.textContent("#resolution")) === "replayed", "Replay resolves the dead letter as replayed");
  check(confirmations === 1, "Replay asked for a confirmation first");

  // The dead letter keeps the history of its attempts and links to the row
  // its replay made, whose page links back.
  const history = await page.$$eval('#attempts tr[data-attempt]', (trs) =>
    trs.map((tr) => ({ attempt: tr.dataset.attempt, error: tr.querySelector(".err").textContent })));
  check(history.length === 1 && history[0].attempt === "1" && history[0].error.includes("127.0.0.1:9"),
        `the dead letter shows its attempt history (${JSON.stringify(history)})`);
  const newRow = sql(`SELECT id FROM outbox WHERE replayed_from = '${toReplay}'`);
  await page.click("#replayed-as");
  await page.waitForURL(`${base}/apps/shop/outbox/${newRow}`);
  check(["due", "scheduled", "retrying", "running"].includes((await page.textContent("#state")).trim()),
        "the replayed row's page shows its state");
  check((await page.getAttribute("#replayed-from", "href")) === `/apps/shop/dead-letters/${toReplay}`,
        "the row links back to the dead letter it came from");
  await page.screenshot({ path: `${shots}/row.png`, fullPage: true });
  await page.setViewportSize({ width: 390, height: 844 });
  await page.screenshot({ path: `${shots}/row-phone.png`, fullPage: true });
  await page.setViewportSize({ width: 1280, height: 800 });
  // An id from a log line finds the row through the topics page.
  await page.goto(`${base}/apps/shop/topics`);
  await page.fill('input[name="id"]', newRow);
  await page.click('form[action="/apps/shop/outbox"] button[type="submit"]');
  await page.waitForURL(`${base}/apps/shop/outbox/${newRow}`);
  check(true, "the look-up by id leads to the row");

  // The rows by topic refresh by themselves while the page is open.
  await page.goto(`${base}/apps/shop/topics`);
  await page.evaluate(() => { window.__sameDocument = true; });
  sql("SELECT outbox_enqueue('shop', 'live.refresh')");
  await page.waitForSelector('[data-topic-states="live.refresh"]', { timeout: 20000 });
  check(await page.evaluate(() => window.__sameDocument === true),
        "a row enqueued now appears on the open topics page without a reload");
  // The overview charts the last hour: the four rows that failed at once
  // show as a failure rate of 100 % (the process writes its counts every 5 s).
  await page.waitForFunction(() => (document.querySelector("#failure-rate figcaption")?.textContent ?? "").includes("peak 100 %"),
                             null, { timeout: 30000 });
  check(await page.$$eval("#charts figure.chart svg polyline", (lines) => lines.length) === 3,
        "the overview charts completed per second, failed attempts and the oldest due row");
  check(await page.evaluate(() => window.__sameDocument === true),
        "the charts fill in without a reload");
  await page.screenshot({ path: `${shots}/topics.png`, fullPage: true });

  await page.goto(`${base}/apps/shop/dead-letters/${toIgnore}`);
  await page.click("#ignore");
  await page.waitForSelector("#resolution");
  check((await page.textContent("#resolution")) === "ignored", "Ignore resolves the dead letter as ignored");

  check(sql(`SELECT resolution FROM dead_letters WHERE id = '${toReplay}'`) === "replayed", "the database has the replay");
  check(sql(`SELECT count(*) FROM outbox WHERE replayed_from = '${toReplay}'`) === "1", "the replay enqueued one outbox row");
  check(sql(`SELECT max_attempts FROM outbox WHERE replayed_from = '${toReplay}'`) === "1000", "the replayed row got the 1000 attempts asked for");
  check(sql(`SELECT resolution FROM dead_letters WHERE id = '${toIgnore}'`) === "ignored", "the database has the ignore");

  // The row browser: filter by state and a payload field, act on the whole
  // filter after a page that says how many rows it touches.
  for (const customer of ["c-9", "c-9", "c-9", "c-8"]) {
    sql(`SELECT outbox_enqueue('shop', 'mail.digest', '{"customer": "${customer}"}', now() + interval '1 hour')`);
  }
  await page.goto(`${base}/apps/shop/outbox`);
  await page.selectOption('#row-filter select[name="state"]', "scheduled");
  await page.fill('#row-filter input[name="field"]', "customer=c-9");
  await page.click('#row-filter button[type="submit"]');
  await page.waitForSelector("#row-count");
  const listed = await page.$$eval("#rows tr[data-row]", (trs) => trs.length);
  check(listed === 3 && (await page.textContent("#row-count")) === "3 rows",
        `the browser filters by state and payload field (${listed} rows)`);
  const due = await page.$eval("#rows time", (t) => ({ text: t.textContent, utc: t.title }));
  check(due.utc.endsWith("Z") && !due.text.includes("UTC") && /GMT\+9|JST/.test(due.text),
        `times show in the browser's zone with UTC on hover (${JSON.stringify(due)})`);
  await page.screenshot({ path: `${shots}/rows.png`, fullPage: true });
  await page.setViewportSize({ width: 390, height: 844 });
  await page.screenshot({ path: `${shots}/rows-phone.png`, fullPage: true });
  await page.setViewportSize({ width: 1280, height: 800 });
  await page.emulateMedia({ colorScheme: "dark" });
  const dark = await page.evaluate(() => getComputedStyle(document.body).backgroundColor);
  check(dark === "rgb(20, 23, 28)", `the console follows a dark system theme (${dark})`);
  await page.screenshot({ path: `${shots}/rows-dark.png`, fullPage: true });
  await page.emulateMedia({ colorScheme: "light" });

  await page.selectOption('#bulk-filter select[name="action"]', "retry");
  await page.click('#bulk-filter button[type="submit"]');
  await page.waitForSelector("#confirm-count");
  check((await page.textContent("#confirm-count")).startsWith("3 rows scheduled or retrying"),
        "the bulk action shows how many rows it will touch before it runs");
  check(sql("SELECT count(*) FROM outbox WHERE topic = 'mail.digest' AND run_at <= now()") === "0",
        "nothing changed before the confirmation");
  await page.screenshot({ path: `${shots}/confirm.png`, fullPage: true });
  await page.click("#confirm");
  await page.waitForSelector("#flash");
  check((await page.textContent("#flash")).startsWith("Made 3 rows due now."), "the result is shown after the action");
  check(sql("SELECT count(*) FROM outbox WHERE topic = 'mail.digest' AND payload->>'customer' = 'c-9' AND run_at <= now()") === "3",
        "retry now on the filter made its 3 rows due");

  await page.goto(`${base}/apps/shop/outbox?topic=mail.digest&field=customer%3Dc-8`);
  await page.selectOption('#bulk-filter select[name="action"]', "cancel");
  await page.fill('#bulk-filter input[name="reason"]', "customer left");
  await page.click('#bulk-filter button[type="submit"]');
  await page.waitForSelector("#confirm-count");
  check((await page.textContent("#confirm-count")).startsWith("1 row not running"), "the cancel shows its count first");
  await page.click("#confirm");
  await page.waitForSelector("#flash");
  check((await page.textContent("#flash")).startsWith("Cancelled 1 row"), "the cancel reports what it did");
  check(sql("SELECT count(*) FROM dead_letters WHERE topic = 'mail.digest' AND resolution = 'ignored' AND last_error LIKE '%customer left'") === "1",
        "the cancelled row is an ignored dead letter carrying the reason");

  // The time filter is typed in the browser's zone (Tokyo here) and sent in UTC.
  await page.goto(`${base}/apps/shop/outbox?topic=mail.digest`);
  const hourAgo = await page.evaluate(() => {
    const d = new Date(Date.now() - 3600 * 1000);
    const pad = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  });
  await page.fill('#row-filter input[name="created_from"]', hourAgo);
  await page.click('#row-filter button[type="submit"]');
  await page.waitForSelector("#row-count");
  check(page.url().includes("created_from=") && decodeURIComponent(page.url()).includes("Z")
        && (await page.textContent("#row-count")) === "3 rows",
        `an enqueue time typed in the browser's zone filters in UTC (${decodeURIComponent(page.url())})`);
  check((await page.inputValue('#row-filter input[name="created_from"]')).startsWith(hourAgo.slice(0, 16)),
        "the filter shows the time as it was typed");

  // One row's own actions: retry now from its page.
  const waiting = sql("SELECT outbox_enqueue('shop', 'mail.single', '{}', now() + interval '1 hour')");
  await page.goto(`${base}/apps/shop/outbox/${waiting}`);
  check((await page.textContent("#state")).trim() === "scheduled", "the row waits an hour");
  await page.click("#retry-now");
  await page.waitForSelector("#flash");
  check((await page.textContent("#state")).trim() === "due", "Retry now makes the row due at once");

  // ... and cancel it from its page (a reason and a ticked box); its address
  // then leads to its dead letter, which says what happened.
  await page.fill('#row-actions input[name="reason"]', "sent by hand");
  await page.check('#row-actions input[name="confirm"]');
  await page.click("#cancel-row");
  await page.waitForSelector("#flash");
  check(page.url().includes("/dead-letters/") && (await page.textContent("#resolution")) === "ignored",
        "Cancel on a row's page makes it an ignored dead letter and shows it");

  // Pause and resume a topic, set and remove a limit (each asks first).
  await page.goto(`${base}/apps/shop/topics`);
  await page.fill('form[action="/apps/shop/topics/pause"] input[name="topic"]', "mail.digest");
  await page.fill('form[action="/apps/shop/topics/pause"] input[name="reason"]', "smtp down");
  await page.click('form[action="/apps/shop/topics/pause"] button[type="submit"]');
  await page.waitForSelector('[data-paused="mail.digest"]');
  check((await page.textContent("#flash")).startsWith("Paused"), "a topic is paused, and the page says so");
  await page.click('[data-paused="mail.digest"] button[type="submit"]');
  await page.waitForSelector("[data-paused=none]");
  check(sql("SELECT count(*) FROM outbox_topic_pauses") === "0", "and resumed");
  await page.fill('form[action="/apps/shop/topics/limit"] input[name="topic"]', "mail.digest");
  await page.fill('form[action="/apps/shop/topics/limit"] input[name="max_running"]', "2");
  await page.click('form[action="/apps/shop/topics/limit"] button[type="submit"]');
  await page.waitForSelector('[data-limited="mail.digest"]');
  check(sql("SELECT max_running FROM outbox_topic_limits WHERE topic = 'mail.digest'") === "2", "a limit is set");
  await page.click('[data-limited="mail.digest"] button[type="submit"]');
  await page.waitForSelector("[data-limits=none]");
  check(sql("SELECT count(*) FROM outbox_topic_limits") === "0", "and removed");

  // The dead letters' bulk action on the selected ones.
  await page.goto(`${base}/apps/shop/dead-letters?unresolved=true`);
  const selectable = await page.$$eval('input[name="ids"]', (boxes) => boxes.map((b) => b.value));
  await page.click('#bulk-selected button[name="action"][value="ignore"]');
  check(lastDialog === "Tick the ones to act on first." && new URL(page.url()).pathname === "/apps/shop/dead-letters",
        `with nothing ticked the selection's action says so and sends nothing (${lastDialog})`);
  await page.check(`input[name="ids"][value="${selectable[0]}"]`);
  await page.click('#bulk-selected button[name="action"][value="ignore"]');
  await page.waitForSelector("#flash");
  check(lastDialog === "Ignore the selected dead letters (1)?", `the question names the action and the count (${lastDialog})`);
  check((await page.textContent("#flash")).startsWith("Marked 1 dead letter ignored")
        && sql(`SELECT resolution FROM dead_letters WHERE id = '${selectable[0]}'`) === "ignored",
        "Ignore selected resolves the ticked dead letter");

  // Every unresolved dead letter of a topic, by the list's filter, after its count.
  const unresolvedOf = (topic) => sql(`SELECT count(*) FROM dead_letters d JOIN apps a ON a.id = d.app_id
      WHERE a.slug = 'shop' AND d.resolved_at IS NULL AND d.topic = '${topic}'`);
  const leftTopic = sql(`SELECT d.topic FROM dead_letters d JOIN apps a ON a.id = d.app_id
      WHERE a.slug = 'shop' AND d.resolved_at IS NULL ORDER BY d.created_at LIMIT 1`);
  check(leftTopic !== "", "a dead letter is left to act on by filter");
  const ofTopic = unresolvedOf(leftTopic);
  await page.goto(`${base}/apps/shop/dead-letters?unresolved=true&topic=${encodeURIComponent(leftTopic)}`);
  await page.click('#bulk-filter button[value="ignore"]');
  await page.waitForSelector("#confirm-count");
  check((await page.textContent("#confirm-count")).startsWith(`${ofTopic} unresolved dead letter`),
        `the bulk action by filter shows how many dead letters it takes first (${ofTopic})`);
  check(unresolvedOf(leftTopic) === ofTopic, "and changes nothing before the confirmation");
  await page.click("#confirm");
  await page.waitForSelector("#flash");
  check((await page.textContent("#flash")).startsWith(`Marked ${ofTopic} dead letter`)
        && unresolvedOf(leftTopic) === "0",
        "Ignore all resolves every unresolved dead letter of the filter");
  await page.screenshot({ path: `${shots}/dead-letters-bulk.png`, fullPage: true });

  // The triggers and accounts pages.
  await page.goto(`${base}/apps/shop/triggers`);
  check((await page.textContent("h1")).includes("triggers"), "the triggers page opens");
  await page.screenshot({ path: `${shots}/triggers.png`, fullPage: true });
  await page.goto(`${base}/admin/accounts`);
  check(await page.$$eval("#users tr", (trs) => trs.length) >= 2, "the accounts page lists the users");
  await page.fill('#new-account input[name="email"]', "new@example.com");
  await page.fill('#new-account input[name="password"]', "a long enough password");
  await page.click('#new-account button[type="submit"]');
  await page.waitForSelector("#flash");
  check((await page.textContent("#flash")) === "Created the account new@example.com.",
        "an instance admin creates an account on the accounts page");
  await page.selectOption('#set-role select[name="user"]', { label: "new@example.com" });
  await page.selectOption('#set-role select[name="app"]', "shop");
  await page.selectOption('#set-role select[name="role"]', "viewer");
  await page.click('#set-role button[type="submit"]');
  await page.waitForSelector("#flash");
  check((await page.textContent("#flash")) === "Role set: new@example.com on shop: viewer."
        && sql("SELECT m.role FROM app_members m JOIN users u ON u.id = m.user_id WHERE u.email = 'new@example.com'") === "viewer",
        "and gives it a role on an app");
  await page.screenshot({ path: `${shots}/accounts.png`, fullPage: true });

  // Every action is in the app's audit log, with who made it.
  await page.goto(`${base}/apps/shop/audit`);
  const audit = await page.$$eval("#audit tr[data-audit]", (trs) =>
    trs.map((tr) => Array.from(tr.cells, (td) => td.textContent)));
  const recorded = audit.map((cells) => `${cells[1]} ${cells[2]} ${cells[3]}`);
  check(recorded.includes(`${env("ADMIN_EMAIL")} dead_letter.replay ${toReplay}`)
        && recorded.includes(`${env("ADMIN_EMAIL")} dead_letter.ignore ${toIgnore}`),
        `the audit log records the replay and the ignore (${JSON.stringify(recorded)})`);
  const byFilter = audit.filter((cells) => ["outbox.retry", "outbox.cancel"].includes(cells[2]))
    .map((cells) => `${cells[2]} ${cells[4]}`);
  check(byFilter.includes("outbox.retry 3") && byFilter.includes("outbox.cancel 1") && byFilter.includes("outbox.retry 1"),
        `the audit log records the actions on rows with their counts (${JSON.stringify(byFilter)})`);
  await page.screenshot({ path: `${shots}/audit.png`, fullPage: true });

  // An error page's Back returns to the page the form was sent from.
  await page.goto(`${base}/apps/shop/outbox`);
  await page.fill('#row-filter input[name="payload"]', '{"customer"');
  await page.click('#row-filter button[type="submit"]');
  await page.waitForSelector("#back");
  await page.click("#back");
  await page.waitForURL(`${base}/apps/shop/outbox`);
  check(true, "an error page's Back returns to the page the form was sent from");

  // At a phone's width no page slides sideways (wide tables scroll in their
  // own box), words stay whole and no button wraps its label.
  await page.setViewportSize({ width: 390, height: 844 });
  for (const [name, path] of [["apps", "/apps"], ["topics", "/apps/shop/topics"],
                              ["dead-letters", "/apps/shop/dead-letters?unresolved=true"],
                              ["audit", "/apps/shop/audit"], ["triggers", "/apps/shop/triggers"],
                              ["accounts", "/admin/accounts"]]) {
    await page.goto(`${base}${path}`);
    const fit = await page.evaluate(() => ({
      width: document.documentElement.scrollWidth,
      wrapped: Array.from(document.querySelectorAll("button"))
        .filter((b) => b.offsetParent !== null && b.getClientRects()[0].height > 40)
        .map((b) => b.textContent),
      broken: Array.from(document.querySelectorAll("td, th"))
        .filter((c) => !c.classList.contains("err") && !c.classList.contains("long"))
        .flatMap((c) => (c.textContent.match(/[A-Za-z]{4,}/g) ?? []).map((word) => [c, word]))
        .filter(([c, word]) => {
          const probe = document.createElement("span");
          probe.textContent = word;
          probe.style.whiteSpace = "nowrap";
          c.appendChild(probe);
          const wide = probe.getBoundingClientRect().width > c.clientWidth;
          probe.remove();
          return wide;
        })
        .map(([, word]) => word),
    }));
    check(fit.width <= 390 && fit.wrapped.length === 0 && fit.broken.length === 0,
          `the ${name} page fits a phone's width (${JSON.stringify(fit)})`);
    await page.screenshot({ path: `${shots}/${name}-phone.png`, fullPage: true });
  }
  await page.setViewportSize({ width: 1280, height: 800 });

  await page.goto(`${base}/apps`);
  const after = (await page.textContent('.badge[data-app="shop"]')).trim();
  // Replayed, ignored, ignored when selected, and ignored by filter.
  check(Number(after) === Number(badge) - 3 - Number(ofTopic), `the badge drops to ${after}`);
  check((await page.evaluate(() => window.__cspViolations)) === 0, "no page broke its own content policy");
  await page.screenshot({ path: `${shots}/dashboard.png`, fullPage: true });
  console.log("1 passed, 0 failed");
} finally {
  await browser.close();
}

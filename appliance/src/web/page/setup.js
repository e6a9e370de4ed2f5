// talkbox setup page. Draws every page from the JSON API; server text is only ever set with
// textContent, never as HTML. Changes carry the session's CSRF token in X-CSRF-Token.
"use strict";

const S = { state: null, csrf: "", pre: "", timer: null };

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of kids.flat(Infinity)) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function message(text, kind) {
  const m = document.getElementById("message");
  m.textContent = text || "";
  m.className = kind || "";
  m.hidden = !text;
}

async function api(method, path, body) {
  const headers = {};
  if (method !== "GET") {
    headers["Content-Type"] = "application/json";
    headers["X-CSRF-Token"] = S.csrf || S.pre;
  }
  const r = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await r.json(); } catch (_) { data = null; }
  if (r.status === 401 && S.state === "admin") { await refreshSession(); route(); }
  if (!r.ok) {
    const err = new Error((data && data.error) || ("HTTP " + r.status));
    err.status = r.status;
    throw err;
  }
  return data;
}

async function refreshSession() {
  const s = await (await fetch("/api/session", { credentials: "same-origin" })).json();
  S.state = s.state; S.csrf = s.csrf || ""; S.pre = s.pre || "";
  S.supervised = s.supervised;
  const nav = document.getElementById("nav");
  const admin = S.state === "admin";
  nav.hidden = !admin;
  document.getElementById("menu-toggle").hidden = !admin || window.innerWidth > 640;
  return s;
}

function page(title, ...kids) {
  const main = document.getElementById("main");
  main.replaceChildren(el("h2", { text: title }), ...kids.flat(Infinity).filter(k => k !== null && k !== undefined));
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle("current", a.getAttribute("href") === location.hash));
  if (window.innerWidth <= 640) {
    document.getElementById("nav").classList.add("collapsed");
    document.getElementById("menu-toggle").setAttribute("aria-expanded", "false");
  }
  return main;
}

function field(label, input) { return [el("label", { for: input.id, text: label }), input]; }

function kv(pairs) {
  return el("dl", { class: "kv" }, pairs.map(([k, v]) => [el("dt", { text: k }), el("dd", {}, v)]));
}

function fmtDuration(s) {
  if (s === null || s === undefined) return "-";
  s = Math.floor(s);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function copyButton(text) {
  return el("button", { type: "button", class: "secondary copy", onclick: async (ev) => {
    try { await navigator.clipboard.writeText(text); ev.target.textContent = "Copied"; }
    catch (_) { ev.target.textContent = "Select and copy"; }
  }, text: "Copy" });
}

// ---- claim, login, password ----

function claimPage() {
  const f = el("form", { id: "claim-form" },
    el("p", {}, "This box is not claimed yet. Enter the setup code shown on the box's console (or by ",
      el("code", { text: "talkbox status" }), " as root), then choose the admin password. There is no default password."),
    field("Setup code", el("input", { id: "claim-code", autocomplete: "off", placeholder: "XXXX-XXXX-XXXX-XXXX", required: true })),
    field("Admin password (at least 10 characters)", el("input", { id: "claim-password", type: "password", autocomplete: "new-password", required: true })),
    field("Repeat the password", el("input", { id: "claim-password2", type: "password", autocomplete: "new-password", required: true })),
    field("Engineer public key (optional)", el("input", { id: "claim-key", autocomplete: "off", placeholder: "talkbox-engineer-ed25519 BASE64" })),
    el("p", { class: "muted", text: "Give an engineer key only if a certified engineer will provision this box remotely; it lets bundles signed with that key change the box." }),
    el("button", { id: "claim-submit", type: "submit", text: "Claim this box" }));
  f.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const p = document.getElementById("claim-password").value;
    if (p !== document.getElementById("claim-password2").value) { message("The two passwords differ.", "error"); return; }
    try {
      await api("POST", "/api/claim", { code: document.getElementById("claim-code").value, password: p,
        engineer_key: document.getElementById("claim-key").value || null });
      await refreshSession();
      message("The box is yours. Next: add your Nextcloud server.", "info");
      if (location.hash === "#backends") route(); else go("#backends");
    } catch (e) { message(e.message, "error"); }
  });
  page("Claim this box", f);
}

function loginPage() {
  const f = el("form", { id: "login-form" },
    field("Admin password", el("input", { id: "login-password", type: "password", autocomplete: "current-password", required: true })),
    el("button", { id: "login-submit", type: "submit", text: "Log in" }));
  f.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await api("POST", "/api/login", { password: document.getElementById("login-password").value });
      await refreshSession();
      message("", "");
      route();
    } catch (e) { message(e.message, "error"); }
  });
  page("Log in", f);
}

function accountPage() {
  const must = S.state === "set-password";
  const f = el("form", { id: "password-form" },
    must ? el("p", { text: "You came in with a one-time link. Set the admin password now." }) : null,
    must ? null : field("Current password", el("input", { id: "old-password", type: "password", autocomplete: "current-password" })),
    field("New password (at least 10 characters)", el("input", { id: "new-password", type: "password", autocomplete: "new-password" })),
    el("button", { id: "password-submit", type: "submit", text: "Change password" }));
  f.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await api("POST", "/api/password", { old: must ? "" : document.getElementById("old-password").value,
        new: document.getElementById("new-password").value });
      await refreshSession();
      message("Password changed. Other sessions were logged out.", "info");
      if (must) go("#status");
    } catch (e) { message(e.message, "error"); }
  });
  page("Account", f);
}

// ---- status ----

function chart(title, series, unit, max) {
  const W = 300, H = 100;
  const all = series.flatMap(s => s.values);
  const top = Math.max(max || 0, ...all, 1e-9);
  const n = Math.max(...series.map(s => s.values.length), 2);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", title);
  const colors = ["#0969da", "#bf3989"];
  series.forEach((s, i) => {
    const pts = s.values.map((v, j) => `${(j / (n - 1)) * W},${H - (v / top) * (H - 4) - 2}`).join(" ");
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", pts);
    line.setAttribute("fill", "none");
    line.setAttribute("stroke", colors[i % 2]);
    line.setAttribute("stroke-width", "1.5");
    line.setAttribute("vector-effect", "non-scaling-stroke");
    svg.append(line);
  });
  const last = series.map(s => `${s.name} ${(s.values.at(-1) ?? 0).toFixed(1)} ${unit}`).join(" · ");
  return el("div", { class: "chart" }, el("div", { class: "title", text: title }), svg,
    el("div", { class: "muted", text: last + ` (max ${top.toFixed(1)} ${unit}, last 15 min)` }));
}

async function statusPage() {
  let d;
  try { d = await api("GET", "/api/status"); } catch (e) { message(e.message, "error"); return; }
  if (location.hash !== "#status") return;
  const sup = d.supervisor;
  const rows = sup ? sup.services.map(s => {
    const cls = s.state === "running" ? "ok" : (["starting", "waiting", "stopping"].includes(s.state) ? "warn" : "bad");
    return el("tr", {}, el("td", { text: s.name }), el("td", { class: cls, text: s.state }),
      el("td", { text: s.pid ?? "-" }), el("td", { text: fmtDuration(s.uptime_s) }),
      el("td", { text: s.restarts }), el("td", { text: s.last_exit || "-" }));
  }) : [];
  const sig = d.signaling || {};
  const h = d.history || [];
  page("Status",
    kv([["Version", "talkbox " + d.version], ["Boot slot", d.boot_slot],
      ["Supervisor", sup ? `PID ${sup.pid}, up ${fmtDuration(sup.uptime_s)}, ${sup.ready ? "all services ready" : "not all services ready"}` : (d.supervisor_error || "-")],
      ["Sessions", sig.sessions ?? (sig.error || "-")], ["Rooms", sig.rooms ?? "-"],
      ["Publishers / subscribers", `${sig.publishers ?? "-"} / ${sig.subscribers ?? "-"}`]]),
    el("h3", { text: "Services" }),
    el("div", { class: "scroll" }, el("table", { id: "services" },
      el("thead", {}, el("tr", {}, ["Service", "State", "PID", "Uptime", "Restarts", "Last error"].map(t => el("th", { text: t })))),
      el("tbody", {}, rows))),
    el("h3", { text: "Load" }),
    h.length < 2 ? el("p", { class: "muted", text: `Charts appear after the first samples (every ${d.sample_every_s} s).` }) : null,
    el("div", { class: "charts" },
      chart("Network", [{ name: "in", values: h.map(x => x.rx_mbps) }, { name: "out", values: h.map(x => x.tx_mbps) }], "Mbit/s"),
      chart("CPU", [{ name: "CPU", values: h.map(x => x.cpu_pct) }], "%", 100),
      chart("Memory", [{ name: "used", values: h.map(x => x.mem_pct) }], "%", 100)));
}

// ---- Nextcloud backends ----

async function backendsPage() {
  let d;
  try { d = await api("GET", "/api/backends"); } catch (e) { message(e.message, "error"); return; }
  if (location.hash !== "#backends") return;
  const list = d.backends.map(b => {
    const rows = [
      ["Signaling server URL", d.signaling_url],
      ["Shared secret", b.secret],
      ["TURN server", d.turn_server + "  (turn:, UDP and TCP)"],
      ["TURN secret", d.turn_secret],
      ["STUN server", d.stun_server],
    ];
    const results = el("div", { class: "test-results" });
    return el("div", { class: "card backend", "data-id": b.id },
      el("h3", { text: b.id }),
      el("p", {}, "Nextcloud: ", b.urls.join(", ")),
      el("p", { class: "muted", text: "Paste these into Nextcloud → Administration settings → Talk (High-performance backend, STUN and TURN servers):" }),
      el("div", { class: "snippet" }, rows.map(([k, v]) => [
        el("span", { class: "name", text: k }),
        el("code", { "data-field": k, text: k === "TURN server" ? d.turn_server : v }),
        copyButton(k === "TURN server" ? d.turn_server : v)])),
      el("details", { class: "test-login" },
        el("summary", { text: "Nextcloud admin login for the Nextcloud → box test (optional, not stored)" }),
        field("Nextcloud admin user", el("input", { class: "nc-user", autocomplete: "off" })),
        field("App password", el("input", { class: "nc-password", type: "password", autocomplete: "off" }))),
      el("button", { type: "button", class: "secondary test", text: "Test", onclick: async (ev) => {
        const card = ev.target.closest(".backend");
        results.replaceChildren(el("p", { text: "Testing… (up to half a minute)" }));
        try {
          const t = await api("POST", "/api/backends/test", { id: b.id,
            nc_user: card.querySelector(".nc-user").value.trim(), nc_password: card.querySelector(".nc-password").value });
          results.replaceChildren(...t.results.map(r => el("div", { class: "test-result", "data-url": r.url },
            el("p", {}, el("span", { class: r.ok ? "ok" : "bad", text: r.ok ? "OK " : "Problem " }), r.url),
            el("ul", {}, r.checks.map(c => el("li", { "data-check": c.name, "data-ok": String(c.ok) },
              el("span", { class: c.ok === true ? "ok" : c.ok === false ? "bad" : "warn", text: c.ok === true ? "OK" : c.ok === false ? "Problem" : "Not tested" }),
              ` ${c.name}: ${c.detail}`, c.remedy ? el("div", { class: "muted", text: c.remedy }) : null))))));
        } catch (e) { results.replaceChildren(el("p", { class: "bad", text: e.message })); }
      } }),
      el("button", { type: "button", class: "secondary", text: "New secret", onclick: async () => {
        if (!confirm("Make a new shared secret? Nextcloud must then be given the new one.")) return;
        try { await api("POST", "/api/backends", { id: b.id, urls: b.urls, new_secret: true }); backendsPage(); }
        catch (e) { message(e.message, "error"); }
      } }),
      el("button", { type: "button", class: "danger", text: "Remove", onclick: async () => {
        if (!confirm(`Remove backend ${b.id}? Its Nextcloud can no longer use this box.`)) return;
        try { await api("POST", "/api/backends/remove", { id: b.id }); message(`Removed ${b.id}.`, "info"); backendsPage(); }
        catch (e) { message(e.message, "error"); }
      } }),
      results);
  });
  const f = el("form", { id: "backend-form" },
    el("h3", { text: "Add or edit a Nextcloud server" }),
    field("Name (letters, digits, - or _)", el("input", { id: "backend-id", placeholder: "cloud" })),
    field("Nextcloud URL(s), one per line", el("textarea", { id: "backend-urls", placeholder: "https://cloud.example.com", style: null })),
    el("button", { id: "backend-save", type: "submit", text: "Save" }));
  f.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const id = document.getElementById("backend-id").value.trim();
    const urls = document.getElementById("backend-urls").value.split(/\s+/).filter(Boolean);
    try {
      await api("POST", "/api/backends", { id, urls });
      message(`Saved ${id}. Copy the values below into Talk's settings.`, "info");
      backendsPage();
    } catch (e) { message(e.message, "error"); }
  });
  page("Nextcloud servers",
    d.backends.length ? null : el("p", { text: "No Nextcloud server uses this box yet." }),
    el("div", { id: "backend-list" }, list), f);
}

// ---- certificate ----

async function certificatePage() {
  let d;
  try { d = await api("GET", "/api/certificate"); } catch (e) { message(e.message, "error"); return; }
  if (location.hash !== "#certificate") return;
  const c = d.certificate;
  const f = el("form", { id: "cert-form" },
    el("h3", { text: "Upload a certificate" }),
    el("p", { class: "muted", text: "Paste the full chain (server certificate first, then intermediates) and its private key, in PEM. They are checked (key matches, chain complete, names, dates) before they replace the current one." }),
    field("Certificate chain (PEM)", el("textarea", { id: "cert-pem", placeholder: "-----BEGIN CERTIFICATE-----" })),
    field("Private key (PEM)", el("textarea", { id: "key-pem", placeholder: "-----BEGIN PRIVATE KEY-----" })),
    el("button", { id: "cert-upload", type: "submit", text: "Check and install" }));
  f.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      const r = await api("POST", "/api/certificate", { cert: document.getElementById("cert-pem").value, key: document.getElementById("key-pem").value });
      message(`Installed the certificate for ${r.names.join(", ")}. The services now serve it.`, "info");
      certificatePage();
    } catch (e) { message("Not installed: " + e.message, "error"); }
  });
  page("Certificate",
    el("div", { id: "cert-info" }, kv([["Names", c.names.join(", ")], ["Subject", c.subject], ["Issuer", c.issuer + (c.self_signed ? " (self-signed)" : "")],
      ["Valid", `${d.not_before} to ${d.not_after} (${d.days_left} days left)`], ["Chain", c.chain_len + " certificate(s)"],
      ["Public name", d.public_name]])),
    acmeSection(d.acme || {}),
    f);
}

function acmeSection(a) {
  const box = el("section", { id: "acme" }, el("h3", { text: "Automatic certificate (ACME)" }));
  if (a.error) { box.append(el("p", { class: "error", text: a.error })); return box; }
  if (!a.enabled) {
    box.append(el("p", { class: "muted", text: "Off. To get a certificate from Let's Encrypt (or another ACME CA) and renew it automatically, set web.acme_enabled = true and put the box's public DNS name in supervisor.names; the CA must reach the box on port 80." }));
    return box;
  }
  const state = a.ordering ? "ordering a certificate now…" : (a.last_error ? "the last order failed" : (a.last_success ? "certificate obtained" : "waiting for the next check"));
  box.append(kv([["State", state], ["CA", a.directory], ["Names", (a.names || []).join(", ") || "(none: set supervisor.names)"],
    ["Renews", `when fewer than ${a.renew_before_days} days are left`], ["Last order", a.last_attempt || "-"],
    ["Last success", a.last_success || "-"], ["Next check", a.next_check || "-"]]));
  if (a.last_error) box.append(el("p", { id: "acme-error", class: "error", text: a.last_error }));
  box.append(el("button", { id: "acme-renew", type: "button", disabled: a.ordering, text: "Renew now", onclick: async () => {
    try { await api("POST", "/api/acme/renew", {}); message("Ordering a certificate; this page updates when it is done.", "info"); setTimeout(certificatePage, 2000); }
    catch (e) { message("Not started: " + e.message, "error"); }
  } }));
  return box;
}

// ---- network, bandwidth ----

async function networkPage() {
  let d;
  try { d = await api("GET", "/api/network"); } catch (e) { message(e.message, "error"); return; }
  if (location.hash !== "#network") return;
  const netForm = await settingsForm("net", "Change names and addresses", [
    ["supervisor.names", "Public DNS names and addresses of the box (comma-separated)", "list"],
    ["sfu.public_ips", "Public IPs for ICE, behind NAT (comma-separated)", "list"],
    ["signaling.listen", "Signaling HTTPS address (IP:port)", "text"],
    ["sfu.media_port_min", "SFU media ports from", "number"], ["sfu.media_port_max", "to", "number"]]);
  if (location.hash !== "#network") return;
  page("Network and identity",
    kv([["Host name", d.hostname], ["Public name", d.public_name], ["Configured names", d.names.join(", ") || "(none: set supervisor.names)"],
      ["Public IPs for ICE", d.public_ips.join(", ") || "(none: set sfu.public_ips behind NAT)"]]),
    el("h3", { text: "Service ports" }),
    el("div", { class: "scroll" }, el("table", {}, el("thead", {}, el("tr", {}, ["Service", "Protocol", "Port", "Enabled"].map(t => el("th", { text: t })))),
      el("tbody", {}, d.ports.map(p => el("tr", {}, el("td", { text: p.service }), el("td", { text: p.proto }), el("td", { text: p.port }), el("td", { text: p.enabled ? "yes" : "no" })))))),
    netForm,
    el("h3", { text: "Network interfaces" }),
    el("table", {}, el("tbody", {}, d.nics.map(n => el("tr", {}, el("td", { text: n.name }), el("td", { text: n.up ? "up" : "down" }),
      el("td", { text: n.speed_mbps ? n.speed_mbps + " Mbit/s" : "speed unknown" }))))));
}

// A form over some of the editable settings (GET/POST /api/settings). Values shown are those
// in force in the supervisor; a change is checked as a whole config before it is written.
async function settingsForm(id, title, fields) {
  let cur;
  try { cur = await api("GET", "/api/settings"); } catch (e) { return el("p", { class: "error", text: "Settings unavailable: " + e.message }); }
  const inputId = k => "set-" + k.replace(/[._]/g, "-");
  const f = el("form", { id: id + "-settings" }, el("h3", { text: title }),
    fields.map(([k, label, kind]) => {
      const v = cur[k];
      const input = kind === "bool" ? el("input", { id: inputId(k), type: "checkbox", checked: !!v })
        : el("input", { id: inputId(k), type: kind === "number" ? "number" : "text", value: kind === "list" ? (v || []).join(", ") : String(v ?? "") });
      return field(label, input);
    }),
    el("button", { id: id + "-save", type: "submit", text: "Save" }));
  f.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const values = {};
    for (const [k, , kind] of fields) {
      const input = document.getElementById(inputId(k));
      const before = cur[k];
      let v = kind === "bool" ? input.checked : kind === "list" ? input.value.split(",").map(x => x.trim()).filter(x => x) : kind === "number" ? input.value.trim() : input.value;
      const same = kind === "list" ? JSON.stringify(v) === JSON.stringify(before || []) : String(v) === String(before ?? "");
      if (!same) values[k] = kind === "number" && /^-?[0-9]+$/.test(v) ? Number(v) : v;
    }
    if (!Object.keys(values).length) { message("Nothing changed.", "info"); return; }
    try {
      await api("POST", "/api/settings", { values });
      message("Saved: " + Object.keys(values).join(", ") + ". The services concerned restart with it.", "info");
      route();
    } catch (e) { message("Not saved: " + e.message, "error"); }
  });
  return f;
}

async function speedTest(out) {
  out.textContent = "Measuring download…";
  try {
    let t0 = performance.now();
    const r = await fetch("/api/speedtest/down?mb=8", { credentials: "same-origin" });
    const n = (await r.arrayBuffer()).byteLength;
    const down = n * 8 / ((performance.now() - t0) / 1000) / 1e6;
    out.textContent = `Download ${down.toFixed(1)} Mbit/s; measuring upload…`;
    const up = new Uint8Array(8 * 1024 * 1024);
    for (let i = 0; i < up.length; i += 65536) crypto.getRandomValues(up.subarray(i, i + 65536));
    t0 = performance.now();
    await fetch("/api/speedtest/up", { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": S.csrf }, body: up });
    const upM = up.length * 8 / ((performance.now() - t0) / 1000) / 1e6;
    out.textContent = `From this browser: download ${down.toFixed(1)} Mbit/s, upload ${upM.toFixed(1)} Mbit/s.`;
    // The download is what the box sent: it may size the box, if the admin says this browser's
    // path is representative (a laptop on Wi-Fi measures its own link, hence a choice).
    const figure = Math.round(down * 10) / 10;
    out.append(" ", el("button", { id: "speed-apply", type: "button", text: `Use ${figure.toFixed(1)} Mbit/s for sizing`, onclick: async () => {
      try {
        await api("POST", "/api/sizing/browser", { mbps: figure });
        await route();
        message(`Sizing now counts ${figure.toFixed(1)} Mbit/s measured by this browser (the lowest figure wins); the limits follow within seconds.`, "info");
      } catch (e) { message("Not used: " + e.message, "error"); }
    } }));
  } catch (e) { out.textContent = "Speed test failed: " + e.message; }
}

async function forgetBrowserFigure() {
  try {
    await api("POST", "/api/sizing/browser", { mbps: null });
    await route();
    message("The browser's figure no longer counts for sizing.", "info");
  } catch (e) { message(e.message, "error"); }
}

async function measureAgain() {
  try {
    await api("POST", "/api/sizing/measure", {});
    message("The SFU measures against its peer now (about 10 s); open this page again to see the result.", "info");
  } catch (e) { message(e.message, "error"); }
}

async function bandwidthPage() {
  let d;
  try { d = await api("GET", "/api/network"); } catch (e) { message(e.message, "error"); return; }
  if (location.hash !== "#bandwidth") return;
  const turnForm = await settingsForm("turn", "Change TURN settings", [
    ["turn.enabled", "TURN server on", "bool"], ["turn.realm", "Realm", "text"],
    ["turn.port", "Port (UDP and TCP)", "number"], ["turn.tls_port", "TLS port", "number"],
    ["turn.relay_port_min", "Relay ports from", "number"], ["turn.relay_port_max", "to", "number"],
    ["turn.relay_address", "Relay address given to clients (empty: the listen address)", "text"],
    ["turn.allowed_peers", "Extra peer networks the relay may reach (CIDR, comma-separated)", "list"]]);
  if (location.hash !== "#bandwidth") return;
  const t = d.turn;
  const out = el("p", { id: "speed-result", class: "muted", text: "" });
  const cap = d.capacity;
  page("TURN and bandwidth",
    el("h3", { text: "TURN" }),
    kv([["Enabled", t.enabled ? "yes" : "no"], ["Realm", t.realm], ["Ports", `${t.port} (UDP/TCP), ${t.tls_port} (TLS)`], ["Relay ports", t.relay_ports],
      ["Allocations", `${t.max_allocations} in all, ${t.max_allocations_per_user} per user`],
      ["Bandwidth per allocation", t.bandwidth_per_allocation_kbps ? t.bandwidth_per_allocation_kbps + " kbit/s" : "no cap"]]),
    turnForm,
    el("h3", { text: "Capacity" }),
    kv([["NIC link speed", d.nic_mbps ? d.nic_mbps + " Mbit/s" : "unknown"], ["Declared uplink", d.declared_uplink_mbps ? d.declared_uplink_mbps + " Mbit/s" : "not declared (sizing.uplink_mbps)"],
      ["Measured", d.measured ? `${d.measured.mbps.toFixed(1)} Mbit/s against ${d.measured.peer}` : (d.measure_error ? "failed: " + d.measure_error : "no peer configured (sizing.peer)")],
      ["Measured by a browser", d.browser_measured ? `${d.browser_measured.mbps.toFixed(1)} Mbit/s by ${d.browser_measured.peer}` : "not used (run the speed test below, then use its figure)"],
      ["Capacity (lowest)", d.capacity_mbps ? d.capacity_mbps.toFixed(1) + " Mbit/s" : "unknown"],
      ["Egress budget", d.budget_mbps ? `${d.budget_mbps.toFixed(0)} Mbit/s (${Math.round(d.egress_fraction * 100)} %)` : "unknown: declare the uplink"],
      ["Bitrate caps", `video ${d.video_cap_mbps.toFixed(2)} Mbit/s, screen ${d.screen_cap_mbps.toFixed(2)} Mbit/s`]]),
    el("p", {}, d.sizing_peer ? el("button", { id: "sizing-measure", type: "button", text: "Measure again against " + d.sizing_peer, onclick: measureAgain }) : null,
      d.browser_measured ? el("button", { id: "browser-forget", type: "button", text: "Forget the browser's figure", onclick: forgetBrowserFigure }) : null),
    cap ? el("p", {}, `One room can hold about ${cap.max_video} participants with video, ${cap.max_audio} audio only, or ${cap.max_screen} with one screen share. All-video room: server out = cap × n × (n−1), in = cap × n.`) : null,
    cap ? el("div", { class: "scroll" }, el("table", { id: "capacity" },
      el("thead", {}, el("tr", {}, ["n", "video out / in", "audio out / in", "screen out / in"].map(x => el("th", { text: x })))),
      el("tbody", {}, cap.rows.map(r => el("tr", {}, el("td", { text: r.participants }),
        el("td", { class: r.video_fits ? "" : "bad", text: `${r.video_out.toFixed(1)} / ${r.video_in.toFixed(1)}` }),
        el("td", { class: r.audio_fits ? "" : "bad", text: `${r.audio_out.toFixed(1)} / ${r.audio_in.toFixed(1)}` }),
        el("td", { class: r.screen_fits ? "" : "bad", text: `${r.screen_out.toFixed(1)} / ${r.screen_in.toFixed(1)}` })))))) : null,
    el("h3", { text: "Speed test from this browser" }),
    el("button", { id: "speed-start", type: "button", text: "Run speed test", onclick: () => speedTest(out) }), out);
}

// ---- self-checks ----

// A relay-only test call inside this browser: two peer connections that may only use relay
// candidates from the box's TURN server, a data channel between them and one echoed message.
// Gathering a relay address proves the allocation; the echo proves the relay carries data.
// Candidates travel inside the descriptions (gathering finished first), so none is lost to a
// race with setRemoteDescription.
function gathered(pc) {
  return new Promise((res) => {
    if (pc.iceGatheringState === "complete") return res();
    pc.addEventListener("icegatheringstatechange", () => { if (pc.iceGatheringState === "complete") res(); });
    setTimeout(res, 8000);
  });
}

async function turnCheck(cell) {
  let a = null, b = null;
  const show = (ok, text) => { cell.className = ok ? "ok" : "bad"; cell.textContent = text; };
  try {
    const c = await api("GET", "/api/checks/turn-credentials");
    const port = c.urls[0].split(":")[2].split("?")[0];
    const cfg = { iceServers: [{ urls: c.urls, username: c.username, credential: c.credential }], iceTransportPolicy: "relay" };
    a = new RTCPeerConnection(cfg); b = new RTCPeerConnection(cfg);
    b.ondatachannel = (ev) => { ev.channel.onmessage = (m) => ev.channel.send("echo:" + m.data); };
    const ch = a.createDataChannel("talkbox-turn-test");
    let t0 = 0;
    const rtt = new Promise((res) => {
      ch.onopen = () => { t0 = performance.now(); ch.send("ping"); };
      ch.onmessage = (m) => res(m.data === "echo:ping" ? performance.now() - t0 : null);
      setTimeout(() => res(null), 20000);
    });
    await a.setLocalDescription(await a.createOffer());
    await gathered(a);
    const relays = (a.localDescription.sdp.match(/ typ relay/g) || []).length;
    await b.setRemoteDescription(a.localDescription);
    await b.setLocalDescription(await b.createAnswer());
    await gathered(b);
    await a.setRemoteDescription(b.localDescription);
    const ms = await rtt;
    if (ms !== null) {
      show(true, `OK: a relay-only test call through the box's TURN server carried data (round trip ${ms.toFixed(0)} ms)`);
      const remedy = cell.parentElement && cell.parentElement.querySelector(".remedy");
      if (remedy) remedy.hidden = true;
    } else if (relays === 0) {
      show(false, `No relay address: this browser cannot reach the box's TURN server. Forward UDP and TCP ${port} to the box (and check that no firewall between this computer and the box blocks them).`);
    } else {
      show(false, `The TURN server gave relay addresses but the test call carried no data: forward the TURN relay port range to the box, and set turn.relay_address to the box's public address if it is behind NAT.`);
    }
  } catch (e) { show(false, e.message); }
  finally { if (a) a.close(); if (b) b.close(); }
}

// A direct test call from this browser to the SFU: no ICE servers, so only a direct path can
// connect; a silent tone as the track (no camera or microphone permission needed). The SFU
// answers as a short-lived publisher; connected = ICE checks both ways plus DTLS over the
// selected pair, which must be UDP to a media port.
async function udpCheck(cell) {
  let pc = null, ctx = null;
  const show = (ok, text) => { cell.className = ok ? "ok" : "bad"; cell.textContent = text; };
  try {
    pc = new RTCPeerConnection({ iceServers: [] });
    ctx = new AudioContext();
    const osc = ctx.createOscillator(), dst = ctx.createMediaStreamDestination();
    osc.connect(dst); osc.start();
    pc.addTransceiver(dst.stream.getAudioTracks()[0], { direction: "sendonly" });
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc);
    const a = await api("POST", "/api/checks/udp-offer", { sdp: pc.localDescription.sdp });
    const offered = (a.sdp.match(/^a=candidate:.*$/gm) || []).map(l => l.split(" ")).filter(f => f[2] && f[2].toLowerCase() === "udp").map(f => `${f[4]}:${f[5]}`);
    const t0 = performance.now();
    const state = new Promise((res) => {
      const look = () => { if (["connected", "failed", "closed"].includes(pc.connectionState)) res(pc.connectionState); };
      pc.addEventListener("connectionstatechange", look);
      setTimeout(() => res(pc.connectionState), 12000);
    });
    // The SFU may offer ICE-TCP too (sfu.ice_tcp); this check is about UDP, so only the UDP
    // candidates are given to the connection (Chromium may otherwise settle on TCP).
    const udpOnly = a.sdp.split("\r\n").filter(l => !(l.startsWith("a=candidate:") && l.split(" ")[2].toLowerCase() !== "udp")).join("\r\n");
    await pc.setRemoteDescription({ type: "answer", sdp: udpOnly });
    const st = await state;
    const ms = performance.now() - t0;
    let pair = null, remote = null;
    if (st === "connected") {
      const stats = await pc.getStats();
      stats.forEach(r => { if (r.type === "transport" && r.selectedCandidatePairId) pair = stats.get(r.selectedCandidatePairId); });
      if (!pair) stats.forEach(r => { if (r.type === "candidate-pair" && r.nominated && r.state === "succeeded") pair = r; });
      if (pair) remote = stats.get(pair.remoteCandidateId);
    }
    const [lo, hi] = a.media_ports;
    const addr = remote ? `${remote.address || remote.ip}:${remote.port}` : "";
    if (remote && remote.protocol === "udp" && remote.port >= lo && remote.port <= hi) {
      show(true, `OK: this browser reached the SFU over UDP at ${addr} in ${ms.toFixed(0)} ms, without TURN`);
      const remedy = cell.parentElement && cell.parentElement.querySelector(".remedy");
      if (remedy) remedy.hidden = true;
    } else if (remote) {
      show(false, `Connected, but not over UDP to a media port (${remote.protocol} ${addr}): UDP ${lo}-${hi} is blocked on the way from this browser.`);
    } else {
      show(false, `No direct UDP path from this browser to the SFU: nothing answered at ${offered.join(", ") || "the offered addresses"} within 12 s (connection ${st}). Forward UDP ${lo}-${hi} to the box, and give its public address under public IPs on the Network page if it is behind NAT.`);
    }
  } catch (e) { show(false, "The test call could not start: " + e.message); }
  finally { if (pc) pc.close(); if (ctx) ctx.close(); }
}

async function checksPage() {
  page("Self-checks", el("p", { text: "Running the checks…" }));
  let d;
  try { d = await api("GET", "/api/checks"); } catch (e) { message(e.message, "error"); return; }
  if (location.hash !== "#checks") return;
  let turnCell = null, udpCell = null;
  const rows = d.checks.map(c => {
    const cell = el("td", { class: c.ok === true ? "ok" : c.ok === false ? "bad" : "warn", text: c.ok === true ? "OK" : c.ok === false ? "Problem" : "See note" });
    if (c.name.startsWith("TURN reachable")) turnCell = cell;
    if (c.name.startsWith("UDP media port") && c.detail.startsWith("run by this page")) udpCell = cell;
    return el("tr", {}, el("td", { text: c.name }), cell, el("td", {}, el("div", { text: c.detail }), c.remedy ? el("div", { class: "muted remedy", text: c.remedy }) : null));
  });
  page("Self-checks", el("div", { class: "scroll" }, el("table", { id: "checks" },
    el("thead", {}, el("tr", {}, ["Check", "Result", "Details and remedy"].map(t => el("th", { text: t })))), el("tbody", {}, rows))));
  if (turnCell) { turnCell.id = "turn-check"; turnCell.textContent = "Testing…"; turnCheck(turnCell); }
  if (udpCell) { udpCell.id = "udp-check"; udpCell.textContent = "Testing…"; udpCheck(udpCell); }
}

// ---- provisioning ----

async function provisioningPage() {
  let d;
  try { d = await api("GET", "/api/provisioning"); } catch (e) { message(e.message, "error"); return; }
  if (location.hash !== "#provisioning") return;
  page("Provisioning",
    el("p", { class: "muted", text: "Changes made by signed provisioning bundles, newest first (last 100)." }),
    d.entries.length === 0 ? el("p", { text: d.present ? "The audit log is empty." : "No provisioning has happened on this box." }) :
      el("div", { class: "scroll" }, el("table", { id: "audit" },
        el("thead", {}, el("tr", {}, ["Time", "Source", "Engineer key", "Serial", "Result", "Message"].map(t => el("th", { text: t })))),
        el("tbody", {}, d.entries.map(e => el("tr", {}, el("td", { text: e.time }), el("td", { text: e.source }), el("td", { text: e.key }),
          el("td", { text: e.serial }), el("td", { class: e.result === "applied" ? "ok" : e.result === "refused" ? "bad" : "warn", text: e.result }), el("td", { text: e.message })))))));
}

// ---- logs ----

async function logsPage() {
  const svc = el("select", { id: "logs-service" }, ["all", "supervisor", "signaling", "sfu", "turn", "web"].map(v => el("option", { value: v, text: v })));
  const lvl = el("select", { id: "logs-level" }, ["error", "warn", "info", "debug"].map(v => el("option", { value: v, text: v })));
  lvl.value = S.logLevel || "info"; svc.value = S.logService || "all";
  const out = el("pre", { id: "logs-lines", class: "scroll" });
  const load = async () => {
    S.logLevel = lvl.value; S.logService = svc.value;
    try {
      const d = await api("GET", `/api/logs?service=${encodeURIComponent(svc.value)}&level=${encodeURIComponent(lvl.value)}`);
      out.textContent = d.available ? (d.lines.join("\n") || "(no lines)") : d.reason;
    } catch (e) { out.textContent = e.message; }
  };
  svc.addEventListener("change", load); lvl.addEventListener("change", load);
  page("Logs", el("div", { class: "card" }, field("Service", svc), field("Level and more severe", lvl)),
    el("p", {}, el("a", { href: "/api/support-bundle", download: "talkbox-support.json", id: "support-bundle", text: "Download a support bundle" }),
      " (config without secrets, versions, recent logs)."), out);
  load();
}

// ---- backup, restore, factory reset ----

function backupPage() {
  const b = el("form", { id: "backup-form" }, el("h3", { text: "Back up the configuration" }),
    el("p", { class: "muted", text: "The file holds the config, the secrets, the certificate and key, and the admin password hash, encrypted with your passphrase. Keep the passphrase: without it the file is useless." }),
    field("Passphrase (at least 12 characters)", el("input", { id: "backup-passphrase", type: "password", autocomplete: "new-password" })),
    el("button", { id: "backup-submit", type: "submit", text: "Download backup" }));
  b.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const r = await fetch("/api/backup", { method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": S.csrf },
      body: JSON.stringify({ passphrase: document.getElementById("backup-passphrase").value }) });
    if (!r.ok) { message(((await r.json().catch(() => null)) || {}).error || "HTTP " + r.status, "error"); return; }
    const url = URL.createObjectURL(await r.blob());
    const a = el("a", { href: url, download: "talkbox-backup.json" });
    document.body.append(a); a.click(); a.remove(); URL.revokeObjectURL(url);
    message("Backup downloaded.", "info");
  });
  const r = el("form", { id: "restore-form" }, el("h3", { text: "Restore" }),
    field("Backup file", el("input", { id: "restore-file", type: "file", accept: ".json,application/json" })),
    field("Passphrase", el("input", { id: "restore-passphrase", type: "password", autocomplete: "off" })),
    el("button", { id: "restore-submit", type: "submit", text: "Restore" }));
  r.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const f = document.getElementById("restore-file").files[0];
    if (!f) { message("Choose the backup file first.", "error"); return; }
    try {
      await api("POST", "/api/restore", { backup: await f.text(), passphrase: document.getElementById("restore-passphrase").value });
      message("Restored. The services restart; log in again with the password of the backup.", "info");
    } catch (e) { message(e.message, "error"); }
  });
  const z = el("form", { id: "reset-form" }, el("h3", { text: "Factory reset" }),
    el("p", { text: "Forgets the admin password, every secret, the certificate, the Nextcloud servers, engineer keys and rooms. Ports and names in the config stay, so the box stays reachable. A new setup code appears on the console." }),
    field("Type factory reset to confirm", el("input", { id: "reset-confirm", autocomplete: "off" })),
    el("button", { id: "reset-submit", type: "submit", class: "danger", text: "Reset the box" }));
  z.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      await api("POST", "/api/factory-reset", { confirm: document.getElementById("reset-confirm").value });
      message("The box was reset. Claim it again with the new setup code.", "info");
    } catch (e) { message(e.message, "error"); }
  });
  page("Backup and reset", b, r, z);
}

// ---- routing ----

const PAGES = { "#status": statusPage, "#backends": backendsPage, "#certificate": certificatePage, "#network": networkPage,
  "#bandwidth": bandwidthPage, "#checks": checksPage, "#provisioning": provisioningPage, "#logs": logsPage, "#backup": backupPage, "#account": accountPage };

async function route() {
  clearInterval(S.timer);
  if (S.state === "unclaimed") return claimPage();
  if (S.state === "login") return loginPage();
  if (S.state === "set-password") { location.hash = "#account"; return accountPage(); }
  const f = PAGES[location.hash] || statusPage;
  if (!PAGES[location.hash]) history.replaceState(null, "", "#status");
  await f();
  if (location.hash === "#status") S.timer = setInterval(() => { if (location.hash === "#status") statusPage(); }, 5000);
}

window.addEventListener("resize", () => {
  const small = window.innerWidth <= 640;
  document.getElementById("menu-toggle").hidden = S.state !== "admin" || !small;
  if (!small) document.getElementById("nav").classList.remove("collapsed");
});
// A page change clears the banner, except right after an action that announced something.
window.addEventListener("hashchange", () => { if (!S.keepMessage) message("", ""); S.keepMessage = false; route(); });
function go(hash) { S.keepMessage = location.hash !== hash; location.hash = hash; }
document.addEventListener("DOMContentLoaded", async () => {
  document.getElementById("logout").addEventListener("click", async () => {
    try { await api("POST", "/api/logout"); } catch (_) { /* the session may already be gone */ }
    await refreshSession(); message("Logged out.", "info"); route();
  });
  document.getElementById("menu-toggle").addEventListener("click", (ev) => {
    const nav = document.getElementById("nav");
    nav.classList.toggle("collapsed");
    ev.target.setAttribute("aria-expanded", String(!nav.classList.contains("collapsed")));
  });
  try { await refreshSession(); } catch (e) { message("The box did not answer: " + e.message, "error"); return; }
  route();
});

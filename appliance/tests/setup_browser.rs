//! The setup page end to end in headless Chromium against a real supervisor: claim with the
//! code from the console log (wrong codes refused, then throttled), log out and in (wrong
//! password refused), add a Nextcloud backend and read the Talk values, upload an invalid
//! certificate (clear error, the old one still served), upload a valid one (served after the
//! change, by the setup page and by signaling), change the TURN realm on the page (bad input
//! refused with the reason; a good value is what the TURN server then answers with), and every
//! page at desktop and phone size.
//! Screenshots go to target/setup-screenshots/.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use appliance::supervisor::status::ServiceState;
use common::browser::Browser;
use common::setup_page::{
    T, clear_message, click, goto_page, message_containing, set, wait_element,
};
use common::{Supervisor, https_get, isolated_config};
use serde_json::{Value, json};

fn shots_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/setup-screenshots");
    std::fs::create_dir_all(&d).expect("screenshot dir");
    d
}

async fn shot(b: &Browser, name: &str) {
    // Let the page finish drawing (fetches, charts) before the picture.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let png = b.client.screenshot().await.expect("screenshot");
    std::fs::write(shots_dir().join(format!("{name}.png")), png).expect("write screenshot");
}

struct Pki {
    ca_pem: String,
    chain_pem: String,
    key_pem: String,
}

fn new_pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "Setup Test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let leaf_key = rcgen::KeyPair::generate().expect("key");
    let mut leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
    leaf.subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().expect("ip")));
    let leaf = leaf.signed_by(&leaf_key, &issuer).expect("leaf");
    Pki {
        ca_pem: ca_cert.pem(),
        chain_pem: format!("{}{}", leaf.pem(), ca_cert.pem()),
        key_pem: leaf_key.serialize_pem(),
    }
}

fn signaling_pid(sup: &Supervisor) -> Option<u32> {
    sup.status().and_then(|s| {
        s.services
            .iter()
            .find(|x| x.name == "signaling")
            .and_then(|x| x.pid)
    })
}

fn listen_of(config: &str, section: &str) -> String {
    config
        .split(&format!("[{section}]"))
        .nth(1)
        .and_then(|s| s.split("listen = \"").nth(1))
        .and_then(|s| s.split('"').next())
        .expect("listen address")
        .to_string()
}

/// The first of `n` consecutive free UDP ports below the ephemeral range, where the other
/// listeners of the test (and of other tests) do not get their ports from.
fn free_udp_range(n: u16) -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id();
    for i in 0..500u32 {
        let base = 20_000 + ((seed.wrapping_add(i * 7919)) % 10_000) as u16;
        let free = (base..base + n).all(|p| std::net::UdpSocket::bind(("0.0.0.0", p)).is_ok());
        if free {
            return base;
        }
    }
    panic!("no {n} consecutive free UDP ports between 20000 and 30000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_claims_configures_and_replaces_the_certificate_in_chromium() {
    // A declared uplink, so the capacity table has figures even where sysfs has no NIC speed.
    // signaling.http_listen lets the status page show session and room counts.
    let http = format!("http_listen = \"127.0.0.1:{}\"", common::free_port());
    // The page's TURN test call needs up to four relay ports per visit (two connections, UDP
    // and TCP), and relaying between two allocations on loopback must be allowed (a box relays
    // between its own public addresses).
    let relay = free_udp_range(16);
    let relay_min = format!("relay_port_min = {relay}");
    let relay_max = format!("relay_port_max = {}", relay + 15);
    let config = isolated_config(&[
        ("sfu", "enabled = false"),
        ("sizing", "uplink_mbps = 100"),
        ("signaling", &http),
        ("turn", &relay_min),
        ("turn", &relay_max),
        ("turn", "allowed_peers = [\"127.0.0.0/8\"]"),
        // The name the uploaded certificate carries, so that the self-checks can pass.
        ("supervisor", "names = [\"localhost\"]"),
    ]);
    // A Nextcloud stand-in for the Test button (both directions).
    let (talk, talk_addr) = common::fake_nextcloud::start().await;
    let nc = format!("http://{talk_addr}");
    let web = listen_of(&config, "web");
    let signaling = listen_of(&config, "signaling");
    let sup = Supervisor::start(Some(&config));
    sup.wait_for("web and signaling running", Duration::from_secs(40), |s| {
        ["web", "signaling"].iter().all(|n| {
            s.services
                .iter()
                .any(|x| x.name == *n && x.state == ServiceState::Running)
        })
    });
    // The code a person reads on the console (the supervisor's stderr = the journal).
    let code = sup
        .log()
        .lines()
        .find_map(|l| {
            l.split_once("talkbox: setup code: ")
                .map(|(_, c)| c.trim().to_string())
        })
        .expect("setup code on the console");
    let old_ca = sup.data_dir().join("old-cert.pem");
    std::fs::copy(sup.data_dir().join("tls/cert.pem"), &old_ca).expect("keep old cert");
    let base = format!("https://{web}/");

    let b = Browser::start(&["--ignore-certificate-errors", "--window-size=1280,900"]).await;
    b.client.goto(&base).await.expect("open setup page");
    wait_element(&b, "claim-code").await;
    shot(&b, "01-claim").await;

    // Wrong codes are refused, the fourth attempt is throttled.
    for _ in 0..3 {
        clear_message(&b).await;
        set(&b, "claim-code", "AAAA-BBBB-CCCC-DDDD").await;
        set(&b, "claim-password", "correct horse battery").await;
        set(&b, "claim-password2", "correct horse battery").await;
        click(&b, "claim-submit").await;
        message_containing(&b, "wrong setup code").await;
    }
    clear_message(&b).await;
    click(&b, "claim-submit").await;
    let m = message_containing(&b, "too many wrong attempts").await;
    assert!(m.contains("1 s"), "{m}");
    shot(&b, "02-claim-throttled").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    clear_message(&b).await;
    set(&b, "claim-code", &code.to_lowercase()).await;
    click(&b, "claim-submit").await;
    message_containing(&b, "The box is yours").await;
    wait_element(&b, "backend-form").await;

    // Log out, a wrong password is refused, the right one lets in.
    click(&b, "logout").await;
    wait_element(&b, "login-password").await;
    set(&b, "login-password", "not the password").await;
    click(&b, "login-submit").await;
    message_containing(&b, "wrong password").await;
    shot(&b, "03-login-refused").await;
    set(&b, "login-password", "correct horse battery").await;
    click(&b, "login-submit").await;
    wait_element(&b, "backend-form").await;
    goto_page(&b, "#status", "Services").await;
    wait_element(&b, "services").await;
    // signaling, turn, provision and web (the SFU is off in this test).
    b.wait_for(
        "return document.querySelectorAll('#services tbody tr').length;",
        &json!(4),
        T,
    )
    .await;
    b.wait_for(
        "return document.querySelector('main .kv').textContent.includes('Rooms0');",
        &json!(true),
        T,
    )
    .await;
    shot(&b, "04-status").await;

    // Add a backend and read the values to paste into Talk.
    goto_page(&b, "#backends", "Nextcloud servers").await;
    set(&b, "backend-id", "cloud").await;
    set(&b, "backend-urls", &nc).await;
    let signaling_pid = signaling_pid(&sup);
    click(&b, "backend-save").await;
    message_containing(&b, "Saved cloud").await;
    let secret = b
        .wait_until_set(
            "document.querySelector('.backend[data-id=cloud] code[data-field=\"Shared secret\"]')?.textContent",
            T,
        )
        .await;
    let main_text = b.eval("return document.body.innerText;").await;
    let secret =
        secret.unwrap_or_else(|e| panic!("shared secret not shown: {e}\npage: {main_text}"));
    let secret = secret.as_str().unwrap_or("").to_string();
    let on_disk =
        std::fs::read_to_string(sup.data_dir().join("secrets/backend-cloud")).expect("secret file");
    assert_eq!(secret, on_disk.trim());
    let url = b
        .eval("return document.querySelector('.backend code[data-field=\"Signaling server URL\"]').textContent;")
        .await;
    assert!(url.as_str().unwrap_or("").starts_with("https://"), "{url}");
    let turn = b
        .eval("return document.querySelector('.backend code[data-field=\"TURN secret\"]').textContent;")
        .await;
    assert!(turn.as_str().unwrap_or("").len() >= 32, "{turn}");
    shot(&b, "05-nextcloud").await;

    // The admin pastes the values into Talk, then runs the Test with a Nextcloud admin login:
    // every check passes, Nextcloud → box included (the stand-in's signed announcement reached
    // the restarted signaling service).
    sup.wait_for(
        "signaling restarted with the backend",
        Duration::from_secs(60),
        |s| {
            s.services.iter().any(|x| {
                x.name == "signaling" && x.state == ServiceState::Running && x.pid != signaling_pid
            })
        },
    );
    let shown_url = url.as_str().unwrap_or("").to_string();
    {
        let mut t = talk.lock().expect("lock");
        t.signaling_url = shown_url.clone();
        t.secret = secret.clone();
    }
    b.client
        .execute(
            "const c = document.querySelector('.backend[data-id=cloud]'); c.querySelector('details').open = true; c.querySelector('.nc-user').value = arguments[0]; c.querySelector('.nc-password').value = arguments[1]; c.querySelector('button.test').click(); return 0;",
            vec![json!(common::fake_nextcloud::ADMIN), json!(common::fake_nextcloud::APP_PASSWORD)],
        )
        .await
        .expect("click Test");
    let inbound = b
        .wait_until_set(
            "document.querySelector('.backend[data-id=cloud] li[data-check=\"Nextcloud → box: signed round trip\"]')?.dataset.ok",
            Duration::from_secs(60),
        )
        .await;
    let results = b
        .eval("return document.querySelector('.backend[data-id=cloud] .test-results').innerText;")
        .await;
    assert_eq!(
        inbound,
        Ok(json!("true")),
        "{results}\nsent by Nextcloud: {:?}",
        talk.lock().expect("lock").sent
    );
    let all_ok = b
        .eval("return [...document.querySelectorAll('.backend[data-id=cloud] li[data-check]')].every(li => li.dataset.ok === 'true');")
        .await;
    assert_eq!(all_ok, json!(true), "{results}");
    b.eval("document.querySelector('.backend[data-id=cloud] .test-results').scrollIntoView(); return 0;")
        .await;
    shot(&b, "05b-nextcloud-test").await;

    // An invalid certificate (key of another certificate): clear error, old one still served.
    let good = new_pki();
    let other = new_pki();
    goto_page(&b, "#certificate", "Upload a certificate").await;
    shot(&b, "06-certificate").await;
    set(&b, "cert-pem", &good.chain_pem).await;
    set(&b, "key-pem", &other.key_pem).await;
    click(&b, "cert-upload").await;
    let m = message_containing(&b, "Not installed").await;
    assert!(m.contains("does not belong to the certificate"), "{m}");
    shot(&b, "07-certificate-refused").await;
    let (code_old, body) = https_get(&base, &old_ca);
    assert_eq!(code_old, 200, "old certificate no longer served: {body}");

    // A valid one: served by the setup page at once and by signaling after its restart.
    let new_ca = sup.data_dir().join("new-ca.pem");
    std::fs::write(&new_ca, &good.ca_pem).expect("ca");
    clear_message(&b).await;
    set(&b, "key-pem", &good.key_pem).await;
    click(&b, "cert-upload").await;
    message_containing(&b, "Installed the certificate").await;
    let (c, body) = https_get(&base, &new_ca);
    assert_eq!(
        c, 200,
        "new certificate not served by the setup page: {body}"
    );
    let (c, _) = https_get(&base, &old_ca);
    assert_ne!(c, 200, "the old certificate is still served");
    let start = Instant::now();
    loop {
        let (c, body) = https_get(&format!("https://{signaling}/api/v1/welcome"), &new_ca);
        if c == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "signaling does not serve the new certificate: {c} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.wait_for(
        "return document.getElementById('cert-info').textContent.includes('Setup Test CA');",
        &json!(true),
        T,
    )
    .await;
    shot(&b, "08-certificate-installed").await;
    // The session survived the certificate change (no new login needed).
    goto_page(&b, "#network", "Service ports").await;
    shot(&b, "09-network").await;
    goto_page(&b, "#bandwidth", "Speed test").await;
    shot(&b, "10-bandwidth").await;
    // The speed test from this browser: 8 MiB down and 8 MiB up, figures shown on the page.
    click(&b, "speed-start").await;
    let speed = b
        .wait_until_set(
            "(() => { const t = document.getElementById('speed-result').textContent; return t.startsWith('From this browser') || t.startsWith('Speed test failed') ? t : null; })()",
            Duration::from_secs(60),
        )
        .await
        .unwrap_or_else(|e| panic!("speed test: {e}"));
    let speed = speed.as_str().unwrap_or("").to_string();
    assert!(
        speed.starts_with("From this browser: download") && !speed.contains("NaN"),
        "{speed}"
    );
    println!("speed test in Chromium over loopback: {speed}");
    // Its download figure becomes a sizing figure when the admin says so.
    click(&b, "speed-apply").await;
    message_containing(&b, "Sizing now counts").await;
    goto_page(&b, "#bandwidth", "Speed test").await;
    let row = b
        .wait_until_set(
            "(() => { const t = document.body.innerText; return t.includes(\"by the admin's browser at 127.0.0.1\") ? t : null; })()",
            Duration::from_secs(20),
        )
        .await
        .unwrap_or_else(|e| panic!("the browser's figure on the bandwidth page: {e}"));
    assert!(
        row.as_str()
            .unwrap_or("")
            .contains("Forget the browser's figure"),
        "{row}"
    );
    let stored = std::fs::read_to_string(sup.data_dir().join("sizing/browser.json"))
        .expect("the browser's figure is stored for the SFU's sizer");
    let down: f64 = speed
        .split("download ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|t| t.parse().ok())
        .expect("download figure");
    let stored: Value = serde_json::from_str(&stored).expect("browser.json");
    assert!(
        (stored["mbps"].as_f64().unwrap_or(0.0) - down).abs() < 0.11,
        "stored {stored} for a download of {down} Mbit/s"
    );
    click(&b, "browser-forget").await;
    message_containing(&b, "no longer counts").await;
    assert!(!sup.data_dir().join("sizing/browser.json").exists());
    // Edit a TURN setting: bad input is refused with the reason, a good one is in force.
    wait_element(&b, "set-turn-realm").await;
    set(&b, "set-turn-realm", "bad realm").await;
    click(&b, "turn-save").await;
    let refused = message_containing(&b, "Not saved").await;
    assert!(refused.contains("turn.realm"), "{refused}");
    shot(&b, "10b-turn-refused").await;
    let before = std::fs::read_to_string(sup.data_dir().join("talkbox.toml")).expect("config");
    assert!(!before.contains("bad realm"), "a refused value was written");
    set(&b, "set-turn-realm", "talk.example.test").await;
    click(&b, "turn-save").await;
    message_containing(&b, "Saved: turn.realm").await;
    let turn_port: u16 = config
        .split("[turn]")
        .nth(1)
        .and_then(|s| s.split("port = ").nth(1))
        .and_then(|s| s.lines().next())
        .and_then(|p| p.trim().parse().ok())
        .expect("turn.port in the config");
    let start = Instant::now();
    let mut realm = None;
    while start.elapsed() < Duration::from_secs(40) {
        let mut c = common::turn::TurnClient::udp(([127, 0, 0, 1], turn_port).into());
        realm = c
            .request(&common::stun_msgs::allocate_unsigned())
            .and_then(|r| r.realm);
        if realm.as_deref() == Some("talk.example.test") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        realm.as_deref(),
        Some("talk.example.test"),
        "the TURN server does not use the realm set on the page"
    );
    goto_page(&b, "#bandwidth", "Speed test").await;
    b.wait_for(
        "return document.getElementById('set-turn-realm').value;",
        &json!("talk.example.test"),
        T,
    )
    .await;
    shot(&b, "10c-turn-saved").await;
    goto_page(&b, "#checks", "Clock synchronised").await;
    // The page's own TURN check: a relay-only test call through the box's TURN server that
    // must carry a data-channel message both ways.
    let turn_ok = b
        .wait_until_set(
            "(() => { const c = document.getElementById('turn-check'); return c && c.textContent !== 'Testing…' ? c.textContent : null; })()",
            Duration::from_secs(60),
        )
        .await;
    let checks_text = b
        .eval("return document.getElementById('checks').innerText;")
        .await;
    let turn_ok = turn_ok.unwrap_or_else(|e| panic!("TURN test call: {e}\n{checks_text}"));
    assert!(
        turn_ok.as_str().unwrap_or("").contains("carried data"),
        "{turn_ok}\n{checks_text}"
    );
    println!("TURN test call from Chromium: {turn_ok}");
    shot(&b, "11-checks").await;
    goto_page(&b, "#provisioning", "Provisioning").await;
    shot(&b, "12-provisioning").await;
    goto_page(&b, "#logs", "support bundle").await;
    b.wait_for(
        "return document.getElementById('logs-lines').textContent.length > 0;",
        &json!(true),
        T,
    )
    .await;
    shot(&b, "13-logs").await;
    goto_page(&b, "#account", "Current password").await;
    shot(&b, "13-account-password").await;

    // Phone-sized viewport: the menu collapses, nothing needs sideways scrolling; every page.
    // The window size includes the browser's own frame; grow it by the difference so that the
    // page itself (the viewport) is 390×844.
    b.client.set_window_size(390, 844).await.expect("resize");
    let inner = b
        .eval("return [window.innerWidth, window.innerHeight];")
        .await;
    let (iw, ih) = (
        inner[0].as_i64().unwrap_or(390),
        inner[1].as_i64().unwrap_or(844),
    );
    b.client
        .set_window_size((390 + 390 - iw) as u32, (844 + 844 - ih) as u32)
        .await
        .expect("resize");
    let inner = b
        .eval("return [window.innerWidth, window.innerHeight];")
        .await;
    assert_eq!(inner, json!([390, 844]), "phone viewport");
    for (hash, title) in [
        ("#certificate", "Certificate"),
        ("#network", "Network and identity"),
        ("#bandwidth", "TURN and bandwidth"),
        ("#checks", "Self-checks"),
        ("#provisioning", "Provisioning"),
        ("#logs", "Logs"),
        ("#backup", "Backup and reset"),
        ("#account", "Account"),
    ] {
        goto_page(&b, hash, title).await;
        let wide = b
            .eval("return document.documentElement.scrollWidth <= window.innerWidth + 1;")
            .await;
        assert_eq!(wide, json!(true), "{hash} is wider than the phone viewport");
        if hash == "#checks" {
            wait_element(&b, "checks").await;
            let fits = b
                .eval("const t = document.getElementById('checks'); return t !== null && t.scrollWidth <= t.parentElement.clientWidth + 1;")
                .await;
            assert_eq!(
                fits,
                json!(true),
                "the self-checks need sideways scrolling on a phone"
            );
        }
        shot(&b, &format!("16-phone-{}", &hash[1..])).await;
    }
    goto_page(&b, "#status", "Services").await;
    let inner = b.eval("return window.innerWidth;").await;
    let wide = b
        .eval("return document.documentElement.scrollWidth <= window.innerWidth + 1;")
        .await;
    assert_eq!(
        wide,
        json!(true),
        "page wider than the phone viewport ({inner})"
    );
    shot(&b, "14-phone-status").await;
    goto_page(&b, "#backends", "Nextcloud servers").await;
    let wide = b
        .eval("return document.documentElement.scrollWidth <= window.innerWidth + 1;")
        .await;
    assert_eq!(
        wide,
        json!(true),
        "Nextcloud page wider than the phone viewport"
    );
    shot(&b, "15-phone-nextcloud").await;
    b.close().await;
}

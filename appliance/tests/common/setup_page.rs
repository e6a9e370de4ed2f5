//! The setup page driven in Chromium: the small steps every setup-page test takes (fill a
//! field, click, wait for an element, a page or a message).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::browser::Browser;

/// How long one step may take on a loaded machine.
pub const T: Duration = Duration::from_secs(20);

/// The text of the message banner once it shows one containing `want`.
pub async fn message_containing(b: &Browser, want: &str) -> String {
    let start = Instant::now();
    let mut last = Value::Null;
    while start.elapsed() < T {
        last = b
            .eval("const m = document.getElementById('message'); return m.hidden ? null : m.textContent;")
            .await;
        if last.as_str().is_some_and(|s| s.contains(want)) {
            return last.as_str().unwrap_or("").to_string();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no message containing {want:?}; last: {last}");
}

pub async fn clear_message(b: &Browser) {
    b.eval("const m = document.getElementById('message'); m.hidden = true; m.textContent = ''; return 0;")
        .await;
}

pub async fn set(b: &Browser, id: &str, value: &str) {
    b.client
        .execute(
            "document.getElementById(arguments[0]).value = arguments[1]; return 0;",
            vec![json!(id), json!(value)],
        )
        .await
        .unwrap_or_else(|e| panic!("set #{id}: {e}"));
}

pub async fn click(b: &Browser, id: &str) {
    b.client
        .execute(
            "document.getElementById(arguments[0]).click(); return 0;",
            vec![json!(id)],
        )
        .await
        .unwrap_or_else(|e| panic!("click #{id}: {e}"));
}

pub async fn wait_element(b: &Browser, id: &str) {
    b.wait_for(
        &format!("return document.getElementById('{id}') !== null;"),
        &json!(true),
        T,
    )
    .await;
}

pub async fn goto_page(b: &Browser, hash: &str, marker: &str) {
    b.client
        .execute("location.hash = arguments[0]; return 0;", vec![json!(hash)])
        .await
        .expect("navigate");
    b.wait_for(
        &format!("return document.querySelector('main h2') !== null && document.querySelector('main').textContent.includes({});", json!(marker)),
        &json!(true),
        T,
    )
    .await;
}

/// Claims an unclaimed box on the page at `base` with `code` and `password`; logged in after.
pub async fn claim(b: &Browser, base: &str, code: &str, password: &str) {
    b.client.goto(base).await.expect("open setup page");
    wait_element(b, "claim-code").await;
    set(b, "claim-code", code).await;
    set(b, "claim-password", password).await;
    set(b, "claim-password2", password).await;
    click(b, "claim-submit").await;
    message_containing(b, "The box is yours").await;
    wait_element(b, "backend-form").await;
}

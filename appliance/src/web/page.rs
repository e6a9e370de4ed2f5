//! Server-side rendering of the read-only status page. Every value is HTML-escaped.

use crate::supervisor::status::{ServiceState, SupervisorStatus};

pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn duration(s: f64) -> String {
    let s = s as u64;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min {} s", s / 60, s % 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

pub fn render(status: Result<SupervisorStatus, String>) -> String {
    let body = match status {
        Err(e) => format!(
            "<p class=\"bad\">The supervisor did not answer: {}</p>",
            escape(&e)
        ),
        Ok(s) => {
            let mut rows = String::new();
            for svc in &s.services {
                let class = match svc.state {
                    ServiceState::Running => "ok",
                    ServiceState::Starting | ServiceState::Waiting | ServiceState::Stopping => {
                        "wait"
                    }
                    _ => "bad",
                };
                rows.push_str(&format!(
                    "<tr><td>{}</td><td class=\"{class}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                    escape(&svc.name),
                    escape(svc.state.as_str()),
                    svc.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                    svc.uptime_s.map(duration).unwrap_or_else(|| "-".into()),
                    svc.restarts,
                    escape(svc.last_exit.as_deref().unwrap_or("-")),
                ));
            }
            format!(
                "<p>talkbox {} &middot; supervisor PID {} &middot; up {} &middot; {}</p>\n\
                 <table><thead><tr><th>service</th><th>state</th><th>PID</th><th>uptime</th><th>restarts</th><th>last exit</th></tr></thead>\n<tbody>\n{rows}</tbody></table>",
                escape(&s.version),
                s.pid,
                duration(s.uptime_s),
                if s.ready {
                    "all services ready"
                } else {
                    "not all services ready"
                },
            )
        }
    };
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"2\">\
         <title>talkbox status</title>\
         <style>body{{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}}\
         table{{border-collapse:collapse;width:100%;max-width:60rem}}\
         th,td{{text-align:left;padding:.4rem .6rem;border-bottom:1px solid #ddd}}\
         .ok{{color:#1a7f37;font-weight:600}}.wait{{color:#9a6700}}.bad{{color:#cf222e;font-weight:600}}\
         </style></head><body><h1>talkbox</h1>\n{body}\n</body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::status::ServiceStatus;

    #[test]
    fn status_values_are_escaped() {
        let s = SupervisorStatus {
            version: "0.1.0".into(),
            pid: 1,
            uptime_s: 5.0,
            data_dir: "/d".into(),
            ready: false,
            services: vec![ServiceStatus {
                name: "web".into(),
                state: ServiceState::CrashLoop,
                pid: None,
                uptime_s: None,
                restarts: 7,
                consecutive_failures: 7,
                next_restart_in_ms: Some(100),
                last_exit: Some("<script>alert(1)</script>".into()),
                message: None,
            }],
        };
        let html = render(Ok(s));
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("crash-loop"));
    }
}

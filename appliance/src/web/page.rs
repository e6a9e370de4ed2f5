//! The setup page itself: one HTML file, one script and one style sheet, compiled into the
//! binary (no build step, nothing fetched from elsewhere). The script draws every page from
//! the JSON API and never inserts server text as HTML (it uses `textContent`).

pub const INDEX_HTML: &str = include_str!("page/index.html");
pub const APP_JS: &str = include_str!("page/setup.js");
pub const APP_CSS: &str = include_str!("page/setup.css");

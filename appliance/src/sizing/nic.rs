//! Link speeds of the network interfaces, from sysfs.
//!
//! `/sys/class/net/IFACE/speed` is what `ethtool` prints as "Speed": the kernel fills both from
//! the driver's link settings, so reading the file needs no ioctl and no privilege. It is
//! re-read every few seconds because links renegotiate (a cable swapped, a switch port
//! changed). Interfaces without a speed (Wi-Fi, many virtual ones, a link that is down) report
//! none; the one that counts is the interface of the default route.

use std::path::Path;

/// One interface as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Link {
    pub name: String,
    /// Link speed in Mbit/s; `None` when the driver reports none (or the link is down).
    pub speed_mbps: Option<u64>,
    pub up: bool,
    /// The IPv4 default route leaves through this interface.
    pub default_route: bool,
}

/// All interfaces except loopback, from `sys` (normally `/sys/class/net`) and `route`
/// (normally `/proc/net/route`), sorted by name.
pub fn links(sys: &Path, route: &Path) -> Vec<Link> {
    let default_ifaces =
        default_route_interfaces(&std::fs::read_to_string(route).unwrap_or_default());
    let Ok(dir) = std::fs::read_dir(sys) else {
        return Vec::new();
    };
    let mut out: Vec<Link> = dir
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == "lo" {
                return None;
            }
            let read = |f: &str| std::fs::read_to_string(e.path().join(f)).unwrap_or_default();
            let up = matches!(read("operstate").trim(), "up" | "unknown");
            // The file holds -1 or fails with EINVAL when there is no link.
            let speed_mbps = read("speed")
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|s| *s > 0)
                .map(|s| s as u64);
            Some(Link {
                default_route: default_ifaces.iter().any(|d| d == &name),
                name,
                speed_mbps,
                up,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The link speed that limits the box: the default route's interface if it has a speed,
/// otherwise the fastest interface that is up.
pub fn limiting_speed(links: &[Link]) -> Option<u64> {
    links
        .iter()
        .filter(|l| l.up && l.default_route)
        .filter_map(|l| l.speed_mbps)
        .min()
        .or_else(|| {
            links
                .iter()
                .filter(|l| l.up)
                .filter_map(|l| l.speed_mbps)
                .max()
        })
}

/// Interfaces of IPv4 default routes in the text of `/proc/net/route`.
fn default_route_interfaces(text: &str) -> Vec<String> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let iface = f.next()?;
            let dest = f.next()?;
            (dest == "00000000").then(|| iface.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(root: &Path, name: &str, speed: &str, state: &str) {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("speed"), speed).unwrap();
        std::fs::write(d.join("operstate"), state).unwrap();
    }

    #[test]
    fn default_route_interface_counts_and_unknown_speeds_are_none() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("net");
        iface(&sys, "lo", "-1", "unknown");
        iface(&sys, "eth0", "1000\n", "up");
        iface(&sys, "eth1", "10000\n", "up");
        iface(&sys, "wlan0", "-1\n", "up");
        iface(&sys, "eth2", "25000\n", "down");
        let route = dir.path().join("route");
        std::fs::write(
            &route,
            "Iface\tDestination\tGateway\tFlags\n\
             eth1\t0000A8C0\t00000000\t0001\n\
             eth0\t00000000\t0100A8C0\t0003\n",
        )
        .unwrap();
        let links = links(&sys, &route);
        assert_eq!(links.len(), 4, "{links:?}");
        assert!(links.iter().all(|l| l.name != "lo"));
        let wlan = links.iter().find(|l| l.name == "wlan0").unwrap();
        assert_eq!(wlan.speed_mbps, None);
        // eth1 is faster, but the default route leaves through eth0.
        assert_eq!(limiting_speed(&links), Some(1000));
        // Without a default route: the fastest link that is up (eth2 is down).
        std::fs::write(&route, "Iface\tDestination\n").unwrap();
        assert_eq!(limiting_speed(&super::links(&sys, &route)), Some(10000));
    }
}

//! A NAT lab built from network namespaces and nftables, per
//! docs/nat-lab.md:
//!
//! ```text
//!   ns <p>inet: bridge br0, "the internet", 203.0.113.0/24
//!     <p>pub      203.0.113.10           (DHT node, public services)
//!     <p>ra       wan 203.0.113.2  lan 10.0.1.1   → <p>ha 10.0.1.2
//!     <p>rb       wan 203.0.113.3  lan 10.0.2.1   → <p>hb 10.0.2.2
//! ```
//!
//! Each router gets the NAT type a test asks for. Namespace names start with
//! a per-test prefix, so tests run side by side; dropping the [`Lab`] deletes
//! every namespace it made (and with them their links and rulesets), also when
//! the test fails or panics.

use std::process::{Command, Stdio};

use super::{host_bin, shown, HostProcess, Shown, SOON};

/// The NAT behaviour of a home router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatType {
    /// No NAT and no firewall: the host sits on the internet with the
    /// home's public address (there is no router).
    Open,
    FullCone,
    AddressRestricted,
    PortRestricted,
    Symmetric,
}

/// One home behind a router.
pub struct Home {
    /// The router's namespace (the host's own for an [`NatType::Open`] home).
    pub router: String,
    /// The host's namespace.
    pub host: String,
    /// The host's address.
    pub host_ip: &'static str,
    /// The router's public address (the host's for an [`NatType::Open`]
    /// home).
    pub wan_ip: &'static str,
    /// What the router does.
    pub nat: NatType,
}

impl Home {
    /// The host's namespace and address, for [`Lab::run_plugin`].
    pub fn host_at(&self) -> (&str, &str) {
        (&self.host, self.host_ip)
    }
}

/// A built lab; torn down on drop.
pub struct Lab {
    namespaces: Vec<String>,
    /// The public host's namespace.
    pub public: String,
    pub homes: Vec<Home>,
    /// A directory for the test's files (policy files), removed with the lab.
    pub scratch: tempfile::TempDir,
}

/// The public host's address.
pub const PUBLIC_IP: &str = "203.0.113.10";

const HOMES: [(&str, &str, &str, &str); 2] = [
    ("ra", "ha", "203.0.113.2", "1"),
    ("rb", "hb", "203.0.113.3", "2"),
];

/// Why the lab cannot be built here, if it cannot.
fn unavailable() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("the NAT lab needs root (network namespaces, nftables)".into());
    }
    for tool in ["ip", "nft", "conntrack"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .ok()?;
        if !found.status.success() {
            return Some(format!(
                "`{tool}` is missing: apt-get install -y nftables iproute2 conntrack"
            ));
        }
    }
    None
}

fn run(args: &[&str], stdin: Option<&str>) {
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..]).stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    if let Some(text) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "lab set-up failed: {args:?}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn in_ns(ns: &str, args: &[&str]) {
    let mut full = vec!["ip", "netns", "exec", ns];
    full.extend_from_slice(args);
    run(&full, None);
}

/// The router ruleset for `nat` with wan address `wan` (docs/nat-lab.md#pitfall: the input
/// chain drops unsolicited wan traffic, or the lab lies).
fn ruleset(nat: NatType, wan: &str) -> String {
    let firewall = format!(
        r#"table inet fw {{
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "wan" ct state established,related accept
    iifname "wan" meta l4proto icmp accept
    iifname "wan" drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    iifname "lan" oifname "wan" accept
    iifname "wan" oifname "lan" ct state established,related accept
    {cone}
  }}
}}
"#,
        cone = if matches!(nat, NatType::FullCone | NatType::AddressRestricted) {
            r#"iifname "wan" oifname "lan" ct status dnat accept"#
        } else {
            ""
        }
    );
    let nat_table = match nat {
        NatType::PortRestricted | NatType::Symmetric => format!(
            r#"table ip nat {{
  chain prerouting {{ type nat hook prerouting priority dstnat; }}
  chain postrouting {{ type nat hook postrouting priority srcnat; oifname "wan" snat ip to {wan}{random}; }}
}}
"#,
            random = if nat == NatType::Symmetric {
                " fully-random"
            } else {
                ""
            }
        ),
        NatType::Open => unreachable!("an open home has no router"),
        NatType::FullCone | NatType::AddressRestricted => {
            let (key_type, lookup, store) = if nat == NatType::FullCone {
                ("inet_service", "udp dport", "udp sport")
            } else {
                (
                    "inet_service . ipv4_addr",
                    "udp dport . ip saddr",
                    "udp sport . ip daddr",
                )
            };
            format!(
                r#"table ip nat {{
  map cone {{ type {key_type} : ipv4_addr . inet_service; flags dynamic,timeout; timeout 120s; }}
  chain prerouting {{ type nat hook prerouting priority dstnat;
    iifname "wan" ip daddr {wan} meta l4proto udp dnat ip to {lookup} map @cone; }}
  chain track {{ type filter hook postrouting priority srcnat - 1;
    oifname "wan" meta l4proto udp update @cone {{ {store} timeout 120s : ip saddr . udp sport }}; }}
  chain postrouting {{ type nat hook postrouting priority srcnat; oifname "wan" snat ip to {wan}; }}
}}
"#
            )
        }
    };
    firewall + &nat_table
}

impl Lab {
    /// Builds the lab with one home per NAT type given. Returns `None` (after
    /// saying why on stderr) where the lab cannot be built; with
    /// GRENACHE_REQUIRE_NAT_LAB=1 (set by CI) that is a failure instead.
    pub fn build(test: &str, nats: &[NatType]) -> Option<Lab> {
        assert!(nats.len() <= HOMES.len());
        if let Some(why) = unavailable() {
            if std::env::var("GRENACHE_REQUIRE_NAT_LAB").as_deref() == Ok("1") {
                panic!("{test}: the NAT lab is required here but {why}");
            }
            eprintln!("SKIPPED {test}: {why}");
            return None;
        }
        // Short, unique per test and process.
        let prefix = format!(
            "gh{}{}-",
            std::process::id() % 100_000,
            test.chars()
                .filter(|c| c.is_ascii_alphanumeric())
                .take(6)
                .collect::<String>()
        );
        let ns = |name: &str| format!("{prefix}{name}");
        let mut lab = Lab {
            namespaces: vec![],
            public: ns("pub"),
            homes: vec![],
            scratch: tempfile::tempdir().expect("a temporary directory"),
        };
        let add_ns = |lab: &mut Lab, name: String| {
            run(&["ip", "netns", "add", &name], None);
            lab.namespaces.push(name.clone());
            in_ns(&name, &["ip", "link", "set", "lo", "up"]);
        };
        let inet = ns("inet");
        add_ns(&mut lab, inet.clone());
        in_ns(&inet, &["ip", "link", "add", "br0", "type", "bridge"]);
        in_ns(&inet, &["ip", "link", "set", "br0", "up"]);

        // The public host.
        let public = lab.public.clone();
        add_ns(&mut lab, public);
        run(
            &[
                "ip",
                "link",
                "add",
                "eth0",
                "netns",
                &lab.public,
                "type",
                "veth",
                "peer",
                "name",
                "pub",
                "netns",
                &inet,
            ],
            None,
        );
        in_ns(&inet, &["ip", "link", "set", "pub", "master", "br0", "up"]);
        in_ns(
            &lab.public,
            &[
                "ip",
                "addr",
                "add",
                &format!("{PUBLIC_IP}/24"),
                "dev",
                "eth0",
            ],
        );
        in_ns(&lab.public, &["ip", "link", "set", "eth0", "up"]);

        for (&nat, &(r, h, wan, n)) in nats.iter().zip(HOMES.iter()) {
            let (router, host) = (ns(r), ns(h));
            if nat == NatType::Open {
                // The host itself on the internet, with the public address.
                add_ns(&mut lab, host.clone());
                run(
                    &[
                        "ip", "link", "add", "eth0", "netns", &host, "type", "veth", "peer",
                        "name", r, "netns", &inet,
                    ],
                    None,
                );
                in_ns(&inet, &["ip", "link", "set", r, "master", "br0", "up"]);
                in_ns(
                    &host,
                    &["ip", "addr", "add", &format!("{wan}/24"), "dev", "eth0"],
                );
                in_ns(&host, &["ip", "link", "set", "eth0", "up"]);
                lab.homes.push(Home {
                    router: host.clone(),
                    host,
                    host_ip: wan,
                    wan_ip: wan,
                    nat,
                });
                continue;
            }
            add_ns(&mut lab, router.clone());
            add_ns(&mut lab, host.clone());
            run(
                &[
                    "ip", "link", "add", "wan", "netns", &router, "type", "veth", "peer", "name",
                    r, "netns", &inet,
                ],
                None,
            );
            in_ns(&inet, &["ip", "link", "set", r, "master", "br0", "up"]);
            in_ns(
                &router,
                &["ip", "addr", "add", &format!("{wan}/24"), "dev", "wan"],
            );
            in_ns(&router, &["ip", "link", "set", "wan", "up"]);
            run(
                &[
                    "ip", "link", "add", "lan", "netns", &router, "type", "veth", "peer", "name",
                    "eth0", "netns", &host,
                ],
                None,
            );
            in_ns(
                &router,
                &["ip", "addr", "add", &format!("10.0.{n}.1/24"), "dev", "lan"],
            );
            in_ns(&router, &["ip", "link", "set", "lan", "up"]);
            in_ns(&router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
            in_ns(&router, &["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"]);
            run(
                &["ip", "netns", "exec", &router, "nft", "-f", "-"],
                Some(&ruleset(nat, wan)),
            );
            in_ns(
                &host,
                &[
                    "ip",
                    "addr",
                    "add",
                    &format!("10.0.{n}.2/24"),
                    "dev",
                    "eth0",
                ],
            );
            in_ns(&host, &["ip", "link", "set", "eth0", "up"]);
            in_ns(
                &host,
                &[
                    "ip",
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("10.0.{n}.1"),
                ],
            );
            let host_ip = if n == "1" { "10.0.1.2" } else { "10.0.2.2" };
            lab.homes.push(Home {
                router,
                host,
                host_ip,
                wan_ip: wan,
                nat,
            });
        }
        Some(lab)
    }

    /// A command that runs `program args` inside namespace `ns`.
    pub fn command(&self, ns: &str, program: &std::path::Path, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .env_remove("RUST_LOG");
        cmd
    }
}

impl Lab {
    /// Starts `grenache-host <args>` inside namespace `ns`.
    pub fn host(&self, ns: &str, name: &str, args: &[&str]) -> HostProcess {
        HostProcess::spawn_command(name, self.command(ns, &host_bin(), args))
    }

    /// `run plugins/<plugin>.wasm` in namespace `ns` on address `ip`, joined
    /// through `bootstrap`, with `extra` flags.
    pub fn run_plugin(
        &self,
        at: (&str, &str),
        plugin: &str,
        bootstrap: &str,
        extra: &[&str],
    ) -> HostProcess {
        self.run_plugin_file(at, &super::plugin(plugin), bootstrap, extra)
    }

    /// `run <wasm>` (any plugin file, e.g. a [`super::test_plugin`]) in
    /// namespace `ns` on address `ip`, joined through `bootstrap`, with
    /// `extra` flags.
    pub fn run_plugin_file(
        &self,
        (ns, ip): (&str, &str),
        wasm: &std::path::Path,
        bootstrap: &str,
        extra: &[&str],
    ) -> HostProcess {
        let plugin = wasm.file_stem().unwrap().to_str().unwrap();
        let listen = format!("{ip}:0");
        let mut args = vec![
            "run",
            wasm.to_str().unwrap(),
            "--listen",
            &listen,
            "--bootstrap",
            bootstrap,
        ];
        args.extend_from_slice(extra);
        self.host(ns, &format!("{plugin} at {ip}"), &args)
    }

    /// Runs `grenache-host <args>` inside `ns` to the end.
    pub fn run_host(&self, ns: &str, args: &[&str]) -> Shown {
        shown(self.command(ns, &host_bin(), args).output().unwrap())
    }

    /// The DHT node (with its introducer) on the public host; returns it and
    /// the bootstrap address.
    pub fn public_dht(&self) -> (HostProcess, String) {
        self.public_dht_with(&[])
    }

    /// [`Self::public_dht`] with `extra` flags for `dht` (e.g.
    /// `--introducer-port off`).
    pub fn public_dht_with(&self, extra: &[&str]) -> (HostProcess, String) {
        let bootstrap = format!("{PUBLIC_IP}:20001");
        let mut args = vec!["dht", "--listen", &bootstrap];
        args.extend_from_slice(extra);
        let dht = self.host(&self.public, "dht", &args);
        dht.wait_for("dht listening on", SOON);
        (dht, bootstrap)
    }

    /// Shortens the routers' conntrack UDP timeouts (seconds): unreplied
    /// flows and two-way ones.
    pub fn set_udp_timeouts(&self, unreplied: u32, stream: u32) {
        for home in &self.homes {
            in_ns(
                &home.router,
                &[
                    "sysctl",
                    "-qw",
                    &format!("net.netfilter.nf_conntrack_udp_timeout={unreplied}"),
                    &format!("net.netfilter.nf_conntrack_udp_timeout_stream={stream}"),
                ],
            );
        }
    }

    /// Drops every packet between the two homes' routers on "the internet"
    /// (a firewall between them: each still reaches the public host), or
    /// lets them through again with `blocked` false.
    pub fn block_between_homes(&self, blocked: bool) {
        // Every namespace is the test's prefix and a name: "pub", "inet", …
        let prefix = self.public.strip_suffix("pub").expect("named <prefix>pub");
        let inet = format!("{prefix}inet");
        if !blocked {
            in_ns(
                &inet,
                &["nft", "delete", "table", "bridge", "between_homes"],
            );
            return;
        }
        let (a, b) = (HOMES[0].2, HOMES[1].2);
        let rules = format!(
            r#"table bridge between_homes {{
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ip saddr {a} ip daddr {b} drop
    ip saddr {b} ip daddr {a} drop
  }}
}}
"#
        );
        run(
            &["ip", "netns", "exec", &inet, "nft", "-f", "-"],
            Some(&rules),
        );
    }

    /// The nftables ruleset `home`'s router runs, as `nft list ruleset`
    /// prints it (to check the lab is what a test assumes).
    pub fn ruleset_of(&self, home: &Home) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &home.router, "nft", "list", "ruleset"])
            .output()
            .expect("nft runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Makes `home`'s router forget every flow and mapping it has, as a
    /// router reboot or a NAT rebinding does.
    pub fn forget_mappings(&self, home: &Home) {
        if matches!(home.nat, NatType::FullCone | NatType::AddressRestricted) {
            in_ns(&home.router, &["nft", "flush", "map", "ip", "nat", "cone"]);
        }
        in_ns(&home.router, &["conntrack", "-F"]);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

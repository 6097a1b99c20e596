//! Scraping a Prometheus endpoint (`--metrics`) with a real HTTP client.

use std::collections::HashMap;
use std::time::Duration;

use super::SOON;

/// One scrape, parsed: every sample line as `name{labels}` → value.
pub struct Scrape {
    /// The whole response body.
    pub text: String,
    /// Every sample's value by its series, `name{labels}`.
    pub samples: HashMap<String, f64>,
}

impl Scrape {
    /// `GET http://<addr>/metrics`; checks the status and content type.
    pub fn of(addr: &str) -> Scrape {
        let response = reqwest::blocking::get(format!("http://{addr}/metrics")).unwrap();
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
        let text = response.text().unwrap();
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (series, value) = l.rsplit_once(' ').expect("`series value`");
                let value = value
                    .parse()
                    .unwrap_or_else(|e| panic!("{l:?}: not a number: {e}"));
                (series.to_string(), value)
            })
            .collect();
        Scrape { text, samples }
    }

    /// Scrapes until `ready` holds for a scrape; fails after [`SOON`].
    pub fn until(addr: &str, what: &str, ready: impl Fn(&Scrape) -> bool) -> Scrape {
        let deadline = std::time::Instant::now() + SOON;
        loop {
            let scrape = Scrape::of(addr);
            if ready(&scrape) {
                return scrape;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never {what}:\n{}",
                scrape.text
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The value of `series` (`name{labels}` as scraped); fails without it.
    pub fn value(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no series {series} in the scrape:\n{}", self.text))
    }
}

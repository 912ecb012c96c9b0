//! Reading the agents' Prometheus text exposition.

/// The sum of the samples of `name` whose labels include every `key="value"` of `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, "}"));
            (metric == name).then_some((rest, value))
        })
        .filter(|(rest, _)| {
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    #[test]
    fn sums_matching_series() {
        let text =
            "# TYPE x counter\nx_total{a=\"1\",b=\"2\"} 3\nx_total{a=\"1\",b=\"3\"} 4\ny 9\n";
        assert_eq!(super::sample(text, "x_total", &[("a", "1")]), 7.0);
        assert_eq!(super::sample(text, "x_total", &[("b", "3")]), 4.0);
        assert_eq!(super::sample(text, "y", &[]), 9.0);
        assert_eq!(super::sample(text, "x_total", &[("a", "2")]), 0.0);
    }
}

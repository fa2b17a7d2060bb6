//! "Did you mean ...?": the closest known name to a misspelt one.

/// The candidate closest to `name`, if one is close enough to be a likely typo: Jaro-Winkler
/// similarity above 0.8, or one edit or one swap of neighbours away (Jaro-Winkler sees no
/// match across positions in names as short as `fuv` for `fvu`).
pub fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| {
            let one_edit = name.len() > 1 && strsim::osa_distance(name, c) <= 1;
            let score = strsim::jaro_winkler(name, c);
            (if one_edit { score.max(0.81) } else { score }, c)
        })
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::closest;

    #[test]
    fn typos_find_their_name() {
        let names = ["fvu", "mse", "l0", "stripe_k", "layer_k"];
        assert_eq!(closest("fuv", names), Some("fvu"));
        assert_eq!(closest("stripe_kk", names), Some("stripe_k"));
        assert_eq!(closest("msee", names), Some("mse"));
        assert_eq!(closest("zzzzzz", names), None);
    }
}

//! Topic exchange matching: words separated by `.`, `*` matches exactly one word, `#` zero or
//! more words.

/// Does `routing_key` match the binding `pattern`?
pub fn matches(pattern: &str, routing_key: &str) -> bool {
    match_words(&words(pattern), &words(routing_key))
}

/// The empty string has no words (so `*` does not match it, as in RabbitMQ).
fn words(s: &str) -> Vec<&str> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split('.').collect()
    }
}

fn match_words(p: &[&str], k: &[&str]) -> bool {
    // Iterative matcher with backtracking on the last `#` seen (like glob matching).
    let (mut pi, mut ki) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ki < k.len() {
        if pi < p.len() && p[pi] == "#" {
            star = Some((pi, ki));
            pi += 1;
        } else if pi < p.len() && (p[pi] == "*" || p[pi] == k[ki]) {
            pi += 1;
            ki += 1;
        } else if let Some((sp, sk)) = star {
            pi = sp + 1;
            ki = sk + 1;
            star = Some((sp, sk + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == "#" {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn words_and_wildcards() {
        assert!(matches("a.b.c", "a.b.c"));
        assert!(!matches("a.b.c", "a.b"));
        assert!(matches("a.*.c", "a.b.c"));
        assert!(!matches("a.*.c", "a.c"));
        assert!(matches("a.#", "a"));
        assert!(matches("a.#", "a.b.c"));
        assert!(matches("#", ""));
        assert!(matches("#", "a.b"));
        assert!(matches("#.c", "c"));
        assert!(matches("a.#.b", "a.b"));
        assert!(matches("a.#.b", "a.x.y.b"));
        assert!(!matches("a.#.b", "a.x.y.c"));
        assert!(matches("*.#", "a"));
        assert!(!matches("*", ""));
        assert!(matches("", ""));
        assert!(!matches("*.*", "a"));
        assert!(matches("#.#", "a.b"));
        assert!(matches("a.#.#.b", "a.b"));
        assert!(!matches("a.*", "a.b.c"));
    }
}

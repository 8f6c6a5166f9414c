//! Checks of command-line values, shared by the subcommands so that every
//! range is checked, and worded, the same way.

use std::fmt::Display;
use std::ops::RangeInclusive;

use anyhow::Result;

/// `value` of `flag` lies in `range`: "--backends must be in 1..=50 (got 0)".
pub fn in_range<T: PartialOrd + Display>(
    flag: &str,
    value: T,
    range: RangeInclusive<T>,
) -> Result<()> {
    anyhow::ensure!(
        range.contains(&value),
        "{flag} must be in {}..={} (got {value})",
        range.start(),
        range.end()
    );
    Ok(())
}

/// `value` of `flag` is above 0 and at most `max`: "--seconds must be in
/// (0, 60] (got 0)".
pub fn positive_at_most(flag: &str, value: f64, max: f64) -> Result<()> {
    anyhow::ensure!(
        value > 0.0 && value <= max,
        "{flag} must be in (0, {max}] (got {value})"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_name_the_flag_the_bounds_and_the_value() {
        assert!(in_range("--n", 1, 1..=3).is_ok());
        assert!(in_range("--n", 3, 1..=3).is_ok());
        let e = in_range("--n", 0usize, 1..=3).unwrap_err().to_string();
        assert_eq!(e, "--n must be in 1..=3 (got 0)");
        assert!(in_range("--n", 4u8, 1..=3).is_err());
        assert!(positive_at_most("--s", 60.0, 60.0).is_ok());
        let e = positive_at_most("--s", 0.0, 60.0).unwrap_err().to_string();
        assert_eq!(e, "--s must be in (0, 60] (got 0)");
        assert!(positive_at_most("--s", 60.5, 60.0).is_err());
        assert!(positive_at_most("--s", f64::NAN, 60.0).is_err());
        assert_eq!(
            positive_at_most("--rate", 0.0, 50_000.0)
                .unwrap_err()
                .to_string(),
            "--rate must be in (0, 50000] (got 0)"
        );
    }
}

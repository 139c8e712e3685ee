//! ISO 3166-1 alpha-2: the 249 officially assigned country codes.

const CODES: &str =
    "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL \
BM BN BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK \
DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU \
GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ \
LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY \
MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU \
RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO \
TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW";

/// One bit per two-letter combination: bit `(a - 'A') * 26 + (b - 'A')` is set for an
/// assigned code. Built at compile time, so a lookup is a shift and a mask (this runs for
/// every ingested event).
const ASSIGNED: [u64; 11] = {
    let bytes = CODES.as_bytes();
    let mut bits = [0u64; 11];
    let mut i = 0;
    while i + 1 < bytes.len() {
        let index = (bytes[i] - b'A') as usize * 26 + (bytes[i + 1] - b'A') as usize;
        bits[index / 64] |= 1 << (index % 64);
        i += 3;
    }
    bits
};

/// True for an assigned upper-case alpha-2 code.
pub fn is_country_code(code: &str) -> bool {
    match code.as_bytes() {
        &[a @ b'A'..=b'Z', b @ b'A'..=b'Z'] => {
            let index = (a - b'A') as usize * 26 + (b - b'A') as usize;
            ASSIGNED[index / 64] & (1 << (index % 64)) != 0
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_complete_and_well_formed() {
        let codes: Vec<&str> = CODES.split(' ').collect();
        assert_eq!(codes.len(), 249);
        assert!(codes.windows(2).all(|w| w[0] < w[1]), "sorted, no repeats");
        assert!(codes.iter().all(|c| is_country_code(c)));
        let assigned: u32 = ASSIGNED.iter().map(|w| w.count_ones()).sum();
        assert_eq!(assigned, 249);
    }

    #[test]
    fn only_assigned_upper_case_codes_pass() {
        assert!(is_country_code("US"));
        assert!(is_country_code("DE"));
        assert!(!is_country_code("us"));
        assert!(!is_country_code("XX"));
        assert!(!is_country_code("USA"));
        assert!(!is_country_code(""));
    }
}

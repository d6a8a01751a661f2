//! Colour maps equal to zennit's palettes entry by entry (tools/reference dumps zennit.image.palette).

use ndarray_npy::ReadNpyExt;
use relprop::render::ColorMap;

#[test]
fn palettes_match_zennit_entry_by_entry() {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cmap");
    let arr = ndarray::Array4::<u8>::read_npy(std::fs::File::open(dir.join("zennit_palettes.npy")).unwrap()).unwrap();
    let names = ["bwr", "coldnhot", "seismic", "gray", "hot", "cold", "wred", "wblue", "france", "coolio", "coleus"];
    let levels = [1.0, 0.5, 2.0];
    let mut checked = 0;
    for (i, name) in names.iter().enumerate() {
        let cm = ColorMap::get(name).unwrap();
        for (j, &level) in levels.iter().enumerate() {
            let p = cm.palette(level);
            for k in 0..256 {
                for c in 0..3 {
                    assert_eq!(p[k][c], arr[[i, j, k, c]], "{name} level {level} entry {k} channel {c}");
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 11 * 3 * 256 * 3);
}

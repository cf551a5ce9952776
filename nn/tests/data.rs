//! Data: the embedded MNIST-10k, IDX parsing and its errors, CIFAR-10 records, batching and augmentation.

use std::sync::Arc;

use nn::data::{check_sha256, parse_idx_images, parse_idx_labels, Augment, Dataset, Loader, LoaderConfig};

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mila-data-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn idx_images(n: usize, rows: usize, cols: usize, pixels: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [2051u32, n as u32, rows as u32, cols as u32] {
        b.extend(v.to_be_bytes());
    }
    b.extend_from_slice(pixels);
    b
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [2049u32, labels.len() as u32] {
        b.extend(v.to_be_bytes());
    }
    b.extend_from_slice(labels);
    b
}

#[test]
fn embedded_mnist10k_matches_its_readme() {
    let (train, test) = Dataset::mnist10k().unwrap();
    assert_eq!((train.n, test.n), (8000, 2000));
    assert_eq!((train.height, train.width, train.channels, train.classes), (28, 28, 1, 10));
    let mut counts = [0usize; 10];
    for &l in train.labels.iter().chain(&test.labels) {
        counts[l as usize] += 1;
    }
    assert_eq!(counts, [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]);
}

#[test]
fn damaged_files_are_rejected() {
    let bytes =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../data/mnist-10k/train-labels-idx1-ubyte.gz")).unwrap();
    let good = "fc8f76c84a4c81503ca6696ae11778632d2d93cc770751cbee947ee80898da9d";
    check_sha256("labels", &bytes, good).unwrap();
    let mut bad = bytes.clone();
    bad[100] ^= 1;
    let e = check_sha256("labels", &bad, good).unwrap_err().to_string();
    assert!(e.contains("sha256") && e.contains(good), "{e}");
    // Bad magic, truncation, wrong length: errors, not panics.
    let img = idx_images(2, 2, 2, &[1, 2, 3, 4, 5, 6, 7, 8]);
    assert!(parse_idx_images(&img, "ok").is_ok());
    assert!(parse_idx_images(&img[..10], "short").is_err());
    assert!(parse_idx_images(&img[..19], "cut").is_err());
    assert!(parse_idx_labels(&img, "images as labels").is_err());
    assert!(parse_idx_images(&[], "empty").is_err());
}

#[test]
fn raw_and_gzipped_idx_read_the_same() {
    use std::io::Write;
    let dir = temp_dir("idx");
    let pixels: Vec<u8> = (0..3 * 4 * 5).map(|i| (i * 7 % 256) as u8).collect();
    let (img, lab) = (idx_images(3, 4, 5, &pixels), idx_labels(&[3, 1, 4]));
    std::fs::write(dir.join("train-images-idx3-ubyte"), &img).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&lab).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(dir.join("t10k-images-idx3-ubyte"), &img).unwrap();
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), &lab).unwrap();
    let (train, test) = Dataset::mnist(&dir).unwrap();
    assert_eq!(train.images, pixels);
    assert_eq!(train.labels, vec![3, 1, 4]);
    assert_eq!(test.labels, train.labels);
    assert!(Dataset::mnist(&dir.join("missing")).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cifar_records_split_into_labels_and_pixels() {
    let dir = temp_dir("cifar");
    let record = |label: u8, fill: u8| {
        let mut r = vec![label];
        r.extend(std::iter::repeat_n(fill, 3072));
        r
    };
    for i in 1..=5 {
        std::fs::write(dir.join(format!("data_batch_{i}.bin")), [record(i, i), record(0, 9)].concat()).unwrap();
    }
    std::fs::write(dir.join("test_batch.bin"), record(7, 42)).unwrap();
    let (train, test) = Dataset::cifar10(&dir).unwrap();
    assert_eq!((train.n, test.n, train.channels, train.height), (10, 1, 3, 32));
    assert_eq!(train.labels[..4], [1, 0, 2, 0]);
    assert!(train.image(2).iter().all(|&p| p == 2));
    std::fs::write(dir.join("test_batch.bin"), vec![0u8; 100]).unwrap();
    assert!(Dataset::cifar10(&dir).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

fn small_dataset() -> Arc<Dataset> {
    let (train, _) = Dataset::mnist10k().unwrap();
    let n = 300;
    Arc::new(Dataset { images: train.images[..n * 784].to_vec(), labels: train.labels[..n].to_vec(), n, ..train })
}

fn cfg(shuffle: bool, shift: usize) -> LoaderConfig {
    LoaderConfig {
        batch_size: 64,
        shuffle,
        drop_last: false,
        seed: 5,
        mean: vec![0.1307],
        std: vec![0.3081],
        augment: Augment { pad: 2, random_shift: shift },
    }
}

#[test]
fn shuffling_is_a_seeded_permutation_per_epoch() {
    let l = Loader::new(small_dataset(), cfg(true, 0)).unwrap();
    let (a, b) = (l.order(0), l.order(1));
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(sorted, (0..300).collect::<Vec<_>>());
    assert_ne!(a, b);
    assert_eq!(a, Loader::new(small_dataset(), cfg(true, 0)).unwrap().order(0));
    assert_eq!(Loader::new(small_dataset(), cfg(false, 0)).unwrap().order(3), (0..300).collect::<Vec<_>>());
}

#[test]
fn padding_normalisation_and_shifts() {
    let data = small_dataset();
    let l = Loader::new(data.clone(), cfg(false, 0)).unwrap();
    let b = l.batch(0, 0, &l.order(0));
    assert_eq!(b.shape, [64, 1, 32, 32]);
    let zero = (0.0 - 0.1307) / 0.3081;
    let img = &b.images[..1024];
    for y in 0..32 {
        for x in 0..32 {
            let v = img[y * 32 + x];
            if !(2..30).contains(&y) || !(2..30).contains(&x) {
                assert_eq!(v, zero);
            } else {
                let p = data.image(0)[(y - 2) * 28 + (x - 2)] as f32 / 255.0;
                assert_eq!(v, (p - 0.1307) / 0.3081);
            }
        }
    }
    // Shifted: every value is one of the padded image's values, and the bright pixels are all still there
    // or moved off by at most 2 pixels.
    let s = Loader::new(data.clone(), cfg(false, 2)).unwrap();
    let sb = s.batch(0, 0, &s.order(0));
    let allowed: std::collections::HashSet<u32> = img.iter().map(|v| v.to_bits()).collect();
    assert!(sb.images[..1024].iter().all(|v| allowed.contains(&v.to_bits())));
    let total = |im: &[f32]| im.iter().map(|v| v - zero).sum::<f32>();
    assert!((total(&sb.images[..1024]) - total(img)).abs() < 1e-3, "MNIST digits keep a 4-pixel border of zeros");
    assert_ne!(sb.images, b.images);
}

#[test]
fn threaded_batches_equal_in_thread_batches() {
    let l = Arc::new(Loader::new(small_dataset(), cfg(true, 2)).unwrap());
    assert_eq!(l.num_batches(), 5);
    let here: Vec<_> = l.iter(3, 1).collect();
    let there: Vec<_> = l.spawn(3, 1, 2).into_iter().collect();
    assert_eq!(here.len(), 4);
    assert_eq!(here, there);
    assert_eq!(here.last().unwrap().labels.len(), 300 - 4 * 64);
    let dropped = Loader::new(small_dataset(), LoaderConfig { drop_last: true, ..cfg(true, 0) }).unwrap();
    assert_eq!(dropped.num_batches(), 4);
    assert!(Loader::new(small_dataset(), LoaderConfig { batch_size: 0, ..cfg(true, 0) }).is_err());
    assert!(Loader::new(small_dataset(), LoaderConfig { std: vec![0.0], ..cfg(true, 0) }).is_err());
}

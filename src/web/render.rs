//! Rendered images and thumbnails (PS3.18 8.3.5, 9.5) made by the gateway from one frame of
//! native pixel data, for a PACS answered by DIMSE: the media type from `Accept`, the rendering
//! parameters from the query, and the picture itself (modality and VOI LUT, MONOCHROME1
//! inverted, scaled to the viewport, encoded as JPEG or PNG).
//!
//! Owns: what can be rendered and how. Must not know where the frame came from or who asked:
//! the caller judged the instance before its frame reached here. Anything outside what is
//! rendered faithfully (compressed, palette or YBR pixel data, odd bit depths, pictures larger
//! than [`MAX_SAMPLES`]) is 406, never a wrong picture.

use super::auth::ApiError;
use axum::http::HeaderValue;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::{FileMetaTableBuilder, InMemDicomObject};
use dicom_pixeldata::{ConvertOptions, PixelDecoder, VoiLutFunction, VoiLutOption, WindowLevel};
use image::DynamicImage;
use image::imageops::FilterType;
use std::sync::LazyLock;
use tokio::sync::Semaphore;

/// The most samples (rows × columns × samples per pixel) of a frame rendered: the decoder
/// holds several copies of it at wider types while it works.
pub(crate) const MAX_SAMPLES: u64 = 4096 * 4096;
/// The largest viewport side asked for.
const MAX_VIEWPORT: u32 = 4096;
/// A thumbnail fits this square unless a viewport says otherwise.
const THUMBNAIL: u32 = 128;
/// Renderings at once, gateway-wide: each holds a frame several times over on a blocking
/// thread, so their number bounds the memory they take.
static RENDERING: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(4));

/// The picture formats served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Media {
    Jpeg,
    Png,
}

impl Media {
    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Media::Jpeg => "image/jpeg",
            Media::Png => "image/png",
        }
    }
}

/// The media type an `Accept` header asks for: the first of its ranges served (JPEG for
/// `image/*`, `*/*` and no header, the PS3.18 default), parameters and q-values aside except
/// `q=0`, which refuses a range.
pub(crate) fn media(accept: Option<&HeaderValue>) -> Result<Media, ApiError> {
    let Some(accept) = accept else {
        return Ok(Media::Jpeg);
    };
    let text = accept
        .to_str()
        .map_err(|_| ApiError::BadRequest("the Accept header is not ASCII".into()))?;
    for range in text.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let ty = parts.next().unwrap_or("").to_ascii_lowercase();
        let refused = parts.any(|p| {
            p.strip_prefix("q=")
                .is_some_and(|q| q.parse::<f32>().is_ok_and(|q| q == 0.0))
        });
        if refused {
            continue;
        }
        match ty.as_str() {
            "image/jpeg" | "image/*" | "*/*" => return Ok(Media::Jpeg),
            "image/png" => return Ok(Media::Png),
            _ => {}
        }
    }
    Err(ApiError::NotAcceptable(
        "rendered images are served as image/jpeg or image/png".into(),
    ))
}

/// Rendering parameters (PS3.18 8.3.5.1): a window, a viewport, a JPEG quality.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Options {
    window: Option<(WindowLevel, VoiLutFunction)>,
    /// The box the picture is scaled to fit, its aspect kept.
    viewport: Option<(u32, u32)>,
    /// Whether a picture smaller than the viewport is enlarged to fit it (an asked-for
    /// viewport); a thumbnail's default one only shrinks.
    enlarge: bool,
    quality: u8,
}

/// Parses the query of a rendered (`thumbnail` false) or thumbnail request. A parameter the
/// gateway does not apply (annotation, a viewport's source region) is 400, so a picture never
/// silently lacks what was asked of it.
pub(crate) fn options(query: Option<&str>, thumbnail: bool) -> Result<Options, ApiError> {
    let pairs = super::path::decode_query(query.unwrap_or("")).map_err(ApiError::BadRequest)?;
    options_of(&pairs, thumbnail)
}

/// [`options`] of decoded query parameters; a parameter given twice is 400.
pub(crate) fn options_of(pairs: &[(String, String)], thumbnail: bool) -> Result<Options, ApiError> {
    let bad = |why: &str| ApiError::BadRequest(why.to_string());
    for (i, (k, _)) in pairs.iter().enumerate() {
        if pairs[..i].iter().any(|(seen, _)| seen == k) {
            return Err(bad("a rendering parameter is given twice"));
        }
    }
    let mut o = Options {
        window: None,
        viewport: thumbnail.then_some((THUMBNAIL, THUMBNAIL)),
        enlarge: false,
        quality: 90,
    };
    for (key, value) in pairs {
        let numbers = || value.split(',').map(str::trim).collect::<Vec<_>>();
        match key.as_str() {
            "viewport" => {
                let v = numbers();
                let [w, h] = v.as_slice() else {
                    return Err(bad(
                        "viewport is width,height (a source region is not supported)",
                    ));
                };
                let side = |s: &str| {
                    s.parse::<u32>()
                        .ok()
                        .filter(|n| (1..=MAX_VIEWPORT).contains(n))
                        .ok_or_else(|| bad("viewport sides are whole numbers from 1 to 4096"))
                };
                o.viewport = Some((side(w)?, side(h)?));
                o.enlarge = true;
            }
            "window" if !thumbnail => {
                let v = numbers();
                let (c, w, f) = match v.as_slice() {
                    [c, w] => (c, w, "linear"),
                    [c, w, f] => (c, w, *f),
                    _ => return Err(bad("window is center,width[,function]")),
                };
                let num = |s: &str| {
                    s.parse::<f64>()
                        .ok()
                        .filter(|x| x.is_finite())
                        .ok_or_else(|| bad("window center and width are numbers"))
                };
                let (center, width) = (num(c)?, num(w)?);
                if width <= 0.0 {
                    return Err(bad("a window's width is greater than 0"));
                }
                let function = match f.to_ascii_lowercase().as_str() {
                    "linear" => VoiLutFunction::Linear,
                    "linear-exact" => VoiLutFunction::LinearExact,
                    "sigmoid" => VoiLutFunction::Sigmoid,
                    _ => {
                        return Err(bad(
                            "a window's function is linear, linear-exact or sigmoid",
                        ));
                    }
                };
                o.window = Some((WindowLevel { width, center }, function));
            }
            "quality" if !thumbnail => {
                o.quality = value
                    .parse::<u8>()
                    .ok()
                    .filter(|q| (1..=100).contains(q))
                    .ok_or_else(|| bad("quality is a whole number from 1 to 100"))?;
            }
            // Text the gateway does not burn in: refused rather than left out.
            "annotation" => return Err(bad("annotation is not supported")),
            _ => {
                return Err(bad(
                    "unknown rendering parameter (viewport, window and quality are served)",
                ));
            }
        }
    }
    Ok(o)
}

/// Why the frames of an instance with these attributes are not rendered; `None` when they
/// are. Asked before a byte of pixel data is held.
pub(crate) fn unrenderable(head: &InMemDicomObject) -> Option<&'static str> {
    let int = |t| head.element(t).ok().and_then(|e| e.to_int::<u32>().ok());
    let photometric = head
        .element(tags::PHOTOMETRIC_INTERPRETATION)
        .ok()
        .and_then(|e| e.to_str().ok().map(|s| s.trim().to_string()));
    let samples = int(tags::SAMPLES_PER_PIXEL).unwrap_or(1);
    let fits = match photometric.as_deref() {
        Some("MONOCHROME1" | "MONOCHROME2") => samples == 1,
        Some("RGB") => samples == 3,
        _ => return Some("only MONOCHROME1, MONOCHROME2 and RGB pixel data are rendered"),
    };
    if !fits {
        return Some("the samples per pixel do not fit the photometric interpretation");
    }
    if !matches!(int(tags::BITS_ALLOCATED), Some(8 | 16)) {
        return Some("only 8- and 16-bit pixel data are rendered");
    }
    let (rows, cols) = (
        int(tags::ROWS).unwrap_or(0),
        int(tags::COLUMNS).unwrap_or(0),
    );
    let n = u64::from(rows) * u64::from(cols) * u64::from(samples);
    if n == 0 || n > MAX_SAMPLES {
        return Some("the frame is larger than the gateway renders");
    }
    None
}

/// Renders one frame (its native bytes, `head` the instance's attributes before its pixel
/// data) as a picture, on a blocking thread, a few at a time gateway-wide.
pub(crate) async fn render(
    head: InMemDicomObject,
    frame: Vec<u8>,
    opts: Options,
    media: Media,
) -> Result<Vec<u8>, ApiError> {
    let _turn = RENDERING
        .acquire()
        .await
        .map_err(|_| ApiError::Upstream("rendering is shut down".into()))?;
    tokio::task::spawn_blocking(move || picture(head, frame, &opts, media))
        .await
        .map_err(|_| ApiError::Upstream("the rendering broke off".into()))?
}

fn picture(
    mut obj: InMemDicomObject,
    frame: Vec<u8>,
    opts: &Options,
    media: Media,
) -> Result<Vec<u8>, ApiError> {
    if let Some(why) = unrenderable(&obj) {
        return Err(ApiError::NotAcceptable(why.into()));
    }
    let failed = |e: &dyn std::fmt::Display| {
        // The decoder's words may name values of the instance: logged, not answered.
        tracing::warn!(reason = %e, "a frame could not be rendered");
        ApiError::NotAcceptable("the frame could not be rendered".into())
    };
    let text = |t| {
        obj.element(t)
            .ok()
            .and_then(|e| {
                e.to_str()
                    .ok()
                    .map(|s| s.trim_end_matches('\0').trim().to_string())
            })
            .unwrap_or_default()
    };
    let (class, instance) = (text(tags::SOP_CLASS_UID), text(tags::SOP_INSTANCE_UID));
    let wide = obj
        .element(tags::BITS_ALLOCATED)
        .ok()
        .and_then(|e| e.to_int::<u32>().ok())
        .is_some_and(|b| b > 8);
    // The object holds just this frame, so frame 0 is the one asked for.
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        if wide { VR::OW } else { VR::OB },
        PrimitiveValue::from(frame),
    ));
    obj.put(DataElement::new(
        tags::NUMBER_OF_FRAMES,
        VR::IS,
        PrimitiveValue::from("1"),
    ));
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax(
                    dicom_transfer_syntax_registry::entries::EXPLICIT_VR_LITTLE_ENDIAN.uid(),
                )
                .media_storage_sop_class_uid(class)
                .media_storage_sop_instance_uid(instance),
        )
        .map_err(|e| failed(&e))?;
    let decoded = file.decode_pixel_data().map_err(|e| failed(&e))?;
    let mut convert = ConvertOptions::new().force_8bit();
    if let Some((level, function)) = &opts.window {
        convert = convert.with_voi_lut(VoiLutOption::CustomWithFunction(*level, *function));
    }
    let mut img = decoded
        .to_dynamic_image_with_options(0, &convert)
        .map_err(|e| failed(&e))?;
    if let Some((w, h)) = opts.viewport
        && (opts.enlarge || img.width() > w || img.height() > h)
    {
        img = img.resize(w, h, FilterType::Triangle);
    }
    encode(&img, media, opts.quality).map_err(|e| failed(&e))
}

fn encode(img: &DynamicImage, media: Media, quality: u8) -> Result<Vec<u8>, image::ImageError> {
    let mut out = Vec::new();
    match media {
        Media::Jpeg => {
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
            img.write_with_encoder(enc)?;
        }
        Media::Png => {
            let enc = image::codecs::png::PngEncoder::new(&mut out);
            img.write_with_encoder(enc)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mono(photometric: &str, pixels: &[u16]) -> InMemDicomObject {
        let mut o = InMemDicomObject::new_empty();
        let put = |o: &mut InMemDicomObject, t, vr, v: PrimitiveValue| {
            o.put(DataElement::new(t, vr, v));
        };
        put(
            &mut o,
            tags::SOP_CLASS_UID,
            VR::UI,
            "1.2.840.10008.5.1.4.1.1.7".into(),
        );
        put(&mut o, tags::SOP_INSTANCE_UID, VR::UI, "1.2.3.4".into());
        put(
            &mut o,
            tags::SAMPLES_PER_PIXEL,
            VR::US,
            PrimitiveValue::from(1u16),
        );
        put(
            &mut o,
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            photometric.into(),
        );
        put(&mut o, tags::ROWS, VR::US, PrimitiveValue::from(1u16));
        put(
            &mut o,
            tags::COLUMNS,
            VR::US,
            PrimitiveValue::from(pixels.len() as u16),
        );
        put(
            &mut o,
            tags::BITS_ALLOCATED,
            VR::US,
            PrimitiveValue::from(16u16),
        );
        put(
            &mut o,
            tags::BITS_STORED,
            VR::US,
            PrimitiveValue::from(12u16),
        );
        put(&mut o, tags::HIGH_BIT, VR::US, PrimitiveValue::from(11u16));
        put(
            &mut o,
            tags::PIXEL_REPRESENTATION,
            VR::US,
            PrimitiveValue::from(0u16),
        );
        o
    }

    fn bytes(pixels: &[u16]) -> Vec<u8> {
        pixels.iter().flat_map(|p| p.to_le_bytes()).collect()
    }

    fn gray(png: &[u8]) -> Vec<u8> {
        image::load_from_memory(png)
            .map(|i| i.to_luma8().into_raw())
            .unwrap_or_default()
    }

    #[test]
    fn a_window_maps_values_to_black_and_white() {
        let px = [0u16, 1000, 2000, 4000];
        let mut o = options(Some("window=2000,2000"), false).unwrap_or_else(|_| panic!());
        o.viewport = None;
        let png = picture(mono("MONOCHROME2", &px), bytes(&px), &o, Media::Png)
            .unwrap_or_else(|e| panic!("{e:?}"));
        let g = gray(&png);
        assert_eq!(g.len(), 4);
        assert_eq!((g[0], g[3]), (0, 255), "{g:?}");
        assert!(g[1] < g[2], "{g:?}");
    }

    #[test]
    fn monochrome1_is_inverted() {
        let px = [0u16, 4000];
        let o = options(Some("window=2000,4000"), false).unwrap_or_else(|_| panic!());
        let png = picture(mono("MONOCHROME1", &px), bytes(&px), &o, Media::Png)
            .unwrap_or_else(|e| panic!("{e:?}"));
        let g = gray(&png);
        assert!(g[0] > g[1], "{g:?}");
    }

    #[test]
    fn jpeg_is_a_jpeg_and_a_viewport_scales_keeping_aspect() {
        let px: Vec<u16> = (0..64).map(|i| i * 60).collect();
        let o = options(Some("viewport=16,16&quality=50"), false).unwrap_or_else(|_| panic!());
        let jpg = picture(mono("MONOCHROME2", &px), bytes(&px), &o, Media::Jpeg)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(&jpg[..2], &[0xFF, 0xD8]);
        let img = image::load_from_memory(&jpg).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((img.width(), img.height()), (16, 1));
    }

    #[test]
    fn what_is_not_rendered_faithfully_is_406() {
        let px = [0u16, 1];
        for p in ["PALETTE COLOR", "YBR_FULL_422", "RGB"] {
            let r = picture(
                mono(p, &px),
                bytes(&px),
                &options(None, false).unwrap_or_else(|_| panic!()),
                Media::Png,
            );
            assert!(matches!(r, Err(ApiError::NotAcceptable(_))), "{p}");
        }
        let mut big = mono("MONOCHROME2", &px);
        big.put(DataElement::new(
            tags::ROWS,
            VR::US,
            PrimitiveValue::from(8192u16),
        ));
        big.put(DataElement::new(
            tags::COLUMNS,
            VR::US,
            PrimitiveValue::from(8192u16),
        ));
        assert!(unrenderable(&big).is_some());
    }

    #[test]
    fn parameters_are_parsed_strictly() {
        for q in [
            "window=1",
            "window=1,0",
            "window=1,2,cubic",
            "window=nan,2",
            "viewport=0,10",
            "viewport=10,10,0,0,5,5",
            "quality=0",
            "quality=101",
            "annotation=patient",
            "zoom=2",
            "quality=50&quality=60",
        ] {
            assert!(options(Some(q), false).is_err(), "{q}");
        }
        assert!(
            options(Some("window=1,2"), true).is_err(),
            "a thumbnail has no window"
        );
        let o = options(
            Some("window=40,400,SIGMOID&viewport=10,20&quality=75"),
            false,
        )
        .unwrap_or_else(|_| panic!());
        assert_eq!(o.viewport, Some((10, 20)));
        assert_eq!(o.quality, 75);
        assert_eq!(
            options(None, true).map(|o| o.viewport).ok(),
            Some(Some((128, 128)))
        );
    }

    #[test]
    fn accept_picks_the_first_served_range() {
        let h = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(media(None).ok(), Some(Media::Jpeg));
        assert_eq!(
            media(Some(&h("image/png, image/jpeg"))).ok(),
            Some(Media::Png)
        );
        assert_eq!(
            media(Some(&h("image/gif, */*;q=0.1"))).ok(),
            Some(Media::Jpeg)
        );
        assert_eq!(
            media(Some(&h("image/jpeg;q=0, image/png"))).ok(),
            Some(Media::Png)
        );
        assert!(media(Some(&h("image/gif"))).is_err());
        assert!(media(Some(&h("application/dicom"))).is_err());
    }
}

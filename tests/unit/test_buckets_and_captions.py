import pytest

from core.errors import UserError
from modules.lora_training.dataset.buckets import make_buckets, nearest_bucket, plan_crop
from modules.lora_training.dataset.captions import inject_trigger, merge_existing, needs_captioner
from modules.lora_training.names import validate_name


@pytest.mark.parametrize("resolution", [256, 512, 768, 1024])
def test_buckets_are_multiples_of_64_near_the_target_area(resolution):
    buckets = make_buckets(resolution)
    assert any(b.width == b.height == resolution for b in buckets)
    for b in buckets:
        assert b.width % 64 == 0 and b.height % 64 == 0
        assert abs(b.width * b.height - resolution**2) <= 0.1 * resolution**2
        assert max(b.aspect, 1 / b.aspect) <= 4


def test_nearest_bucket_and_crop_never_stretch():
    buckets = make_buckets(1024)
    bucket = nearest_bucket(3000, 2000, buckets)
    assert bucket.width > bucket.height
    crop = plan_crop(3000, 2000, bucket)
    scale_x, scale_y = crop.resized_width / 3000, crop.resized_height / 2000
    assert abs(scale_x - scale_y) < 0.01, "same scale on both axes"
    assert crop.resized_width >= bucket.width and crop.resized_height >= bucket.height
    assert crop.left == (crop.resized_width - bucket.width) // 2
    portrait = nearest_bucket(800, 1200, buckets)
    assert portrait.height > portrait.width


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("a photo of a man", "ohwx, a photo of a man"),
        ("ohwx, a photo of a man", "ohwx, a photo of a man"),
        ("a photo of OHWX man, smiling", "ohwx, a photo of man, smiling"),
        ("ohwxman and ohwx-style", "ohwx, ohwxman and ohwx-style"),
        ("", "ohwx"),
        ("a dog\x18\x18 on grass", "ohwx, a dog on grass"),
    ],
)
def test_trigger_leads_exactly_once(caption, expected):
    assert inject_trigger(caption, "ohwx") == expected


def test_existing_caption_modes():
    assert merge_existing("mine", "model's", "keep") == "mine"
    assert merge_existing(None, "model's", "keep") == "model's"
    assert merge_existing("mine", "model's", "replace") == "model's"
    assert merge_existing("mine", "model's", "append") == "mine, model's"
    assert not needs_captioner("mine", "keep") and needs_captioner("", "keep") and needs_captioner("x", "append")


@pytest.mark.parametrize("bad", ["", "  ", "a/b", "..", "x\\y", "con", "LPT1.txt", "bad\x07", "x" * 65, "-lead", "a*b"])
def test_bad_names_are_refused(bad):
    with pytest.raises(UserError):
        validate_name(bad)


def test_good_names_pass():
    assert validate_name(" my style v2 ") == "my style v2"
    assert validate_name("Cat_LoRA-1.0") == "Cat_LoRA-1.0"

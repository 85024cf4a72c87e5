"""Corpus definitions and their download (layer 1: imports nmt.errors, nmt.textio and the stdlib).

Owns: which files make up each public corpus (path below a public base address, sha256, size),
fetching them with retries and a timeout, checking size and sha256, unpacking gzip, and the
`NMT_MIRROR` setting that swaps the public base address for a local (or other) mirror folder while
keeping the path below it. Every file is written atomically (nmt.textio.atomic_write), renamed
only once it is complete and verified, so nothing that looks finished is left behind by a
failure; a failed download (missing at its source, a checksum mismatch, a corrupt archive) is a
DownloadError, a runtime failure (exit 1), not a user mistake. Does not own: reading the text
(nmt.textio, nmt.data) or tokenization (nmt.tokenizer).

Output layout of `download(name, langs, out_dir)`: `<out_dir>/<split>.<lang>` (plain UTF-8 text),
beside it the verified download (`<split>.<lang>.gz` for gzip files). Directional corpora (test
sets whose text depends on which side is the source) name their splits `<src>-<tgt>/<name>`; the
short `<name>` is completed from the language order (`--langs en de` = English source), and
the text lands in `<out_dir>/<src>-<tgt>/<name>.<lang>`.
"""

from __future__ import annotations

import difflib
import gzip
import hashlib
import http.client
import os
import shutil
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from nmt.errors import DownloadError, NmtError, UsageError
from nmt.textio import atomic_write

MIRROR_ENV = "NMT_MIRROR"
CACHE_ENV = "NMT_CACHE"
_CHUNK = 1 << 20


class FileSpec(NamedTuple):
    """One file of a corpus: its path below the base address, sha256 and size in bytes."""

    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Corpus:
    """A public corpus as plain data.

    `files` maps split -> language -> FileSpec. `default_splits` are downloaded when no split is
    named (empty = every split). A `directional` corpus keys its splits `<src>-<tgt>/<name>`.
    An empty `base_url` means the files have no public address: only a mirror serves them.
    """

    name: str
    base_url: str
    mirror_dir: str
    files: dict[str, dict[str, FileSpec]]
    default_splits: tuple[str, ...] = ()
    directional: bool = False
    description: str = field(default="", compare=False)

    def langs(self) -> list[str]:
        return sorted({lang for by_lang in self.files.values() for lang in by_lang})

    def split_names(self, langs: list[str] | None = None) -> list[str]:
        """User-facing split names (for directional corpora: those of the langs' direction)."""
        keys = list(self.files)
        if self.directional and langs and len(langs) == 2:
            prefix = f"{langs[0]}-{langs[1]}/"
            return [k.removeprefix(prefix) for k in keys if k.startswith(prefix)]
        return keys

    def split_key(self, split: str, langs: list[str]) -> str:
        """The key of `files` for a user-facing split name."""
        if self.directional and "/" not in split:
            return f"{langs[0]}-{langs[1]}/{split}"
        return split


def _table(text: str, path_of) -> dict[str, dict[str, FileSpec]]:
    """Rows `sha256 size split lang` -> {split: {lang: FileSpec}} (literal tables below)."""
    files: dict[str, dict[str, FileSpec]] = {}
    for row in text.strip().splitlines():
        sha256, size, split, lang = row.split()
        files.setdefault(split, {})[lang] = FileSpec(path_of(split, lang), sha256, int(size))
    return files


# multi30k/dataset, commit a3d2e0d, data/task1/raw/ (every file, mirrored or not).
_MULTI30K = """
200a4a74cc9560f051924abb9803be008d1908d77f747e9141aeb86dfd2797f1 22572 test_2016_flickr cs
9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8 22890 test_2016_flickr de
611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9 21077 test_2016_flickr en
6d326e188d259fb1d04ac19eae3af956559b3a0b93d7635e56c90987c40c8b90 22310 test_2016_flickr fr
a2c89666db00c495cd8513b9d708d5a3acc205d7de312ef2bf5fb7ebc1540aee 21471 test_2017_flickr de
76a444ee25172e72695cddb13ae4a3bda59430617be88e0bb46b60504f054074 19138 test_2017_flickr en
3ba671ceb2299f3304ffafefea7a833d08632fbaf0ba18546f8a2ec2391af496 20434 test_2017_flickr fr
799e4854c25d601cb6cb6be29eabe5667734c61ace2f495e03e429031a0bc338 10230 test_2017_mscoco de
aab300bfb4427697987e02cd0aacd44bfe8aa50456231b6474c08038bbed2b58 8844 test_2017_mscoco en
754f3072ba9f124569ba5258b32730fc1d214bbf8e0c6dfb2b74401676220db0 9751 test_2017_mscoco fr
7d0a9db904f94c554a8c58049a9f3a5357c27f46cc3d710d70cb0b4a2585b8c2 25181 test_2018_flickr cs
ddd0130c7d97482dc5197a02141dae8dd79f20f03586c480d675c09a32daf608 26461 test_2018_flickr de
ef4f4844037d4c5dea75c9a8ed5fd78905967a26f67c255e230cc9780032654d 23514 test_2018_flickr en
fb2b83fcceb937a4f7e3e93c1c51c22aba92f1e342391e6b5ba392b16a920501 25321 test_2018_flickr fr
a65adb8b32e3bc664f21ecba7a6e7f6950fd1f405e135f7c312faabdb6255077 593827 train cs
726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6 637044 train de
d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f 568929 train en
622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c 604242 train fr
b63226e05c4bd5dd6a42897d74b86a1b9d2c31498252c572b1ea7f7996927fcc 22096 val cs
f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a 24681 val de
14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28 21650 val en
ca3106f1a72390591d25f6c45cb4cd39dec4cd3f123e099748a3ce5256c160e9 23001 val fr
"""

# Helsinki-NLP/OPUS-MT-testsets, commit ac0f19c, testsets/<pair>/ (WMT news test sets).
_WMT = """
6d86c805e6cd008c11143816daac272fdf5a3afea816983c43005717d6fe3ae2 298369 de-en/news-test2008 de
134e1140848bb0d05e774dbe35b8b69602faf401250c03dbb437bdbe38c37b6f 263240 de-en/news-test2008 en
da74e91ec9f155a958a9cfcdb8e4291162b31b589e09306c40528aaf684d2fec 69689 de-en/newssyscomb2009 de
b734a44294fa3b23a2491cd9a2c59fb5eb71332ace70b2c9039978863dd0e43d 62557 de-en/newssyscomb2009 en
c3a23d90e89c080cd3257a23365187e91939be4067176861fb88df7f61864b40 382617 de-en/newstest2009 de
3fc92718e7b994ca0a5dc57e63b68d5c80244a56e5bb1cec11d2e8dd10b3ff3c 345562 de-en/newstest2009 en
4f4b02d3abe150ca47a745d138d90f688edb20dd2d2fedca16aa05fd1e2018b1 383291 de-en/newstest2010 de
1ebece77e333965cbc66fde735a6f17e026b4d6690f4f7fdaba839b7bdadac3b 328648 de-en/newstest2010 en
033bc05659f61c5e51170973267d21e23a9a968557b866f3842c92e416a60e1b 450571 de-en/newstest2011 de
d387569743c0fa9097df4d4e2c1dd9e6ba9ef3cee6e0f473da3204c887dcf8fd 396884 de-en/newstest2011 en
946b9587b79271b0f3ce9cc8c0e5b310e3021ef598e1ba5dc2a24fef8960de30 446765 de-en/newstest2012 de
f9e51f85c4948033fc7d77ef427f4d88908a8dd3f778970f62d0baafac3ff97e 381734 de-en/newstest2012 en
d7ea35ab91ff3709e03ad9cb6bf5b4f2cc775cd2d72efd5254c4aec5e69663ca 385433 de-en/newstest2013 de
ace268a1d9724ca76f6d8e5c720ffdc08f01bdce45630ed8b269dc7918e1c16e 332974 de-en/newstest2013 en
ae5d110486bc33d7175e9e28c7d0051eb3e5fcd2166dd93371089852c091a20e 399406 de-en/newstest2014 de
7294bccf2879a97b3706b95c9595f1459617a8ee7130d5d8581c910e69736971 359898 de-en/newstest2014 en
796cce52ab248469187b60f60715a738a0b92944dc010a69a0083de7fae1b513 268951 de-en/newstest2015 de
422fbb5a274c7aae1a0890381cd4516307ca7bc957604220d4871a91664121e5 241016 de-en/newstest2015 en
738ca1ced4099937127be3208ba70d46e7a93550cd57cfd645f3d35e0e52a254 379803 de-en/newstest2016 de
cd5c112a358d9c99b9557eb358e16d7a94f8fa93ad7aa61bf5f1141f2e1f8854 337711 de-en/newstest2016 en
675e4f7e6045dacf56507e29b24106d771a571e0eb58d822806b086cdcf892f4 374670 de-en/newstest2017 de
11adaec47477928dab9cb3fc9279d99dbbbfec7161f3abf6fddd759668fcd703 336817 de-en/newstest2017 en
c53059fc440b3771aef2a83b15fddd8d2b3490c55b552dcae245f9a2df126c9c 387874 de-en/newstest2018 de
721b207ca2b4e4689f978e17ee5edb0988d7c901acd651fd666bcd9c1950233b 351779 de-en/newstest2018 en
601988e41931965e2c4eba80799d1fc9b43837e20bcae8e61edf21542805d449 219591 de-en/newstest2019 de
95152920451528b9e167d42def3fd7d0ea0d9a4f12e88bdf63b4adba4975cb1d 206941 de-en/newstest2019 en
0add9464880d8d0b4b546344c7d77a00711878830397f7333c49c993eb048d31 225881 de-en/newstest2020 de
39ed144d204c675097e5a53514c89549fbe4d753520d96c4c513b8b9920e89a9 208214 de-en/newstest2020 en
0add9464880d8d0b4b546344c7d77a00711878830397f7333c49c993eb048d31 225881 de-en/newstestB2020 de
5975e3a7fb7787d13bb236f508debc7e8bbe60b3ae20f9572f24b6794d7e8e1b 208817 de-en/newstestB2020 en
6d86c805e6cd008c11143816daac272fdf5a3afea816983c43005717d6fe3ae2 298369 en-de/news-test2008 de
134e1140848bb0d05e774dbe35b8b69602faf401250c03dbb437bdbe38c37b6f 263240 en-de/news-test2008 en
da74e91ec9f155a958a9cfcdb8e4291162b31b589e09306c40528aaf684d2fec 69689 en-de/newssyscomb2009 de
b734a44294fa3b23a2491cd9a2c59fb5eb71332ace70b2c9039978863dd0e43d 62557 en-de/newssyscomb2009 en
c3a23d90e89c080cd3257a23365187e91939be4067176861fb88df7f61864b40 382617 en-de/newstest2009 de
3fc92718e7b994ca0a5dc57e63b68d5c80244a56e5bb1cec11d2e8dd10b3ff3c 345562 en-de/newstest2009 en
4f4b02d3abe150ca47a745d138d90f688edb20dd2d2fedca16aa05fd1e2018b1 383291 en-de/newstest2010 de
1ebece77e333965cbc66fde735a6f17e026b4d6690f4f7fdaba839b7bdadac3b 328648 en-de/newstest2010 en
033bc05659f61c5e51170973267d21e23a9a968557b866f3842c92e416a60e1b 450571 en-de/newstest2011 de
d387569743c0fa9097df4d4e2c1dd9e6ba9ef3cee6e0f473da3204c887dcf8fd 396884 en-de/newstest2011 en
946b9587b79271b0f3ce9cc8c0e5b310e3021ef598e1ba5dc2a24fef8960de30 446765 en-de/newstest2012 de
f9e51f85c4948033fc7d77ef427f4d88908a8dd3f778970f62d0baafac3ff97e 381734 en-de/newstest2012 en
d7ea35ab91ff3709e03ad9cb6bf5b4f2cc775cd2d72efd5254c4aec5e69663ca 385433 en-de/newstest2013 de
ace268a1d9724ca76f6d8e5c720ffdc08f01bdce45630ed8b269dc7918e1c16e 332974 en-de/newstest2013 en
ae5d110486bc33d7175e9e28c7d0051eb3e5fcd2166dd93371089852c091a20e 399406 en-de/newstest2014 de
7294bccf2879a97b3706b95c9595f1459617a8ee7130d5d8581c910e69736971 359898 en-de/newstest2014 en
796cce52ab248469187b60f60715a738a0b92944dc010a69a0083de7fae1b513 268951 en-de/newstest2015 de
422fbb5a274c7aae1a0890381cd4516307ca7bc957604220d4871a91664121e5 241016 en-de/newstest2015 en
738ca1ced4099937127be3208ba70d46e7a93550cd57cfd645f3d35e0e52a254 379803 en-de/newstest2016 de
cd5c112a358d9c99b9557eb358e16d7a94f8fa93ad7aa61bf5f1141f2e1f8854 337711 en-de/newstest2016 en
675e4f7e6045dacf56507e29b24106d771a571e0eb58d822806b086cdcf892f4 374670 en-de/newstest2017 de
11adaec47477928dab9cb3fc9279d99dbbbfec7161f3abf6fddd759668fcd703 336817 en-de/newstest2017 en
c53059fc440b3771aef2a83b15fddd8d2b3490c55b552dcae245f9a2df126c9c 387874 en-de/newstest2018 de
721b207ca2b4e4689f978e17ee5edb0988d7c901acd651fd666bcd9c1950233b 351779 en-de/newstest2018 en
ba6b9c811a564c7747bdc92de2b31513bc608fd9c7c24df85b654e38b83bca81 296095 en-de/newstest2019 de
3a62f94f5c42a395d4452ec890ca45afc75866b5b4b1d493429433cfe8469fe9 249742 en-de/newstest2019 en
af6130ca5716921733d3cad61f39c9edd694572deb0fdfc9eae4262ea19d560a 332002 en-de/newstest2020 de
1a21e5c163df57b7755e28d32211c1f74b7e4eeb1768340dc49a206574a6481f 267159 en-de/newstest2020 en
0a46ff30c39651f7916d4df557b0bd799715851e35e136661ee65c02e6b0b6a0 337226 en-de/newstestB2020 de
1a21e5c163df57b7755e28d32211c1f74b7e4eeb1768340dc49a206574a6481f 267159 en-de/newstestB2020 en
"""

# The mirror's iwslt14_de_en/raw/: <seg> text of the IWSLT14 de-en dev/test XMLs (no public
# address: see shared/corpora/iwslt14_de_en/README.md). `test` = the five sets concatenated in
# fairseq's order (dev2010, dev2012, tst2010, tst2011, tst2012), line-parallel to its test set.
_IWSLT14 = """
d3443719d9fe0ed2011519baf10bb5c66f6cf56b3889e340a0478d27f1daf387 41143 dev2010 de
0c656ad94e623e6bad4ce27c156b276e81664eba94b0749ec67bc65409c1af8f 36320 dev2010 en
0b0fe14ad1942fa2be8b0b404816eccde9313c29d97cbab086b453a93d415fe0 41141 dev2012 de
a9a3ae8c6463a5321377cf357e05072c8698cc72b385b56316ca8f355c26d84f 36816 dev2012 en
af70209b5c8aa19e7900067a4cbd6baa7caa0cffe605ba80169ff0510ab522c8 60519 tst2010 de
41f40d9cc760408332eae324ddf12ab7c0d01b77f2c92c0a1fc75c84b947547f 53655 tst2010 en
a058872a1ac1fe1b7a759c4b13a06081a941ce0af42c53f696c868291024b28a 53109 tst2011 de
c178ea394e1fe1659e4b6a780e0deb960a0c1fbe43d47b3f711bec482acc3a25 45966 tst2011 en
f375b08bc2fb22ee2d9f99f14142f2fe1ba98379545f81e8bd630b270221d7e9 60197 tst2012 de
4a5ab37bf72509f16a0c231e23cb1ed71baddc353cf0963be6f8c47b5e3add8e 52566 tst2012 en
1c3286fd15cf92829c14de73532a363190908ab04884864cc1df8668a471fcfc 251810 test de
d84aa507a05e13a16ad7cc3be50ba463740a30750c784b47e606d7d505acd4c6 221244 test en
"""
_IWSLT14_FILES = {
    "dev2010": "IWSLT14.TED.dev2010.de-en",
    "dev2012": "IWSLT14.TEDX.dev2012.de-en",
    "tst2010": "IWSLT14.TED.tst2010.de-en",
    "tst2011": "IWSLT14.TED.tst2011.de-en",
    "tst2012": "IWSLT14.TED.tst2012.de-en",
    "test": "test",
}

# The mirror's tatoeba_test_de_en/: the Tatoeba Translation Challenge de-en test sets (from
# Helsinki-NLP/OPUS-MT-testsets, commit ac0f19c, datasets/helsinki_nlp/tatoeba/testsets/deu-eng/,
# renamed deu/eng -> de/en; see shared/corpora/tatoeba_test_de_en/README.md). Short everyday
# sentences: v2021-08-07 holds 17,565 pairs, v2020-07-28 10,000, every one of them also in
# v2021-08-07 (so the two are not independent data). Roughly in alphabetical order of the German.
_TATOEBA = """
8ffc137e56a0ac43fae6b1cb840f8aa99a31f5c146d018fd68a111b287d3a73e 163300 v2020-07-28 de
ffe69e67593af986ed3aab040217946c3c28801059cc2023f55d2e0960bef850 139590 v2020-07-28 en
9f9e4cfb4f4820ee6f0c81076a9b66f523dabf63b02b57c42e8afb5b49b9dff2 258597 v2021-08-07 de
94fb7926beb6bec4fb3ffd3ee6e89cc8cc64fb97e9c99326d65a01822786da0a 232750 v2021-08-07 en
"""

CORPORA: dict[str, Corpus] = {
    "multi30k": Corpus(
        name="multi30k",
        base_url="https://raw.githubusercontent.com/multi30k/dataset/master/",
        mirror_dir="multi30k",
        files=_table(_MULTI30K, lambda split, lang: f"data/task1/raw/{split}.{lang}.gz"),
        default_splits=("train", "val", "test_2016_flickr", "test_2017_flickr", "test_2017_mscoco"),
        description="Multi30k task 1 (image captions; en, de, fr, cs)",
    ),
    "wmt": Corpus(
        name="wmt",
        base_url="https://raw.githubusercontent.com/Helsinki-NLP/OPUS-MT-testsets/master/",
        mirror_dir="opus-mt-testsets",
        files=_table(_WMT, lambda split, lang: f"testsets/{split}.{lang}"),
        directional=True,
        description="WMT news test sets 2008-2020, de-en and en-de (from OPUS-MT-testsets)",
    ),
    "iwslt14": Corpus(
        name="iwslt14",
        base_url="",
        mirror_dir="iwslt14_de_en",
        files=_table(_IWSLT14, lambda split, lang: f"raw/{_IWSLT14_FILES[split]}.{lang}.gz"),
        default_splits=("test",),
        description="IWSLT14 de-en TED dev/test sets (mirror only: NMT_MIRROR must be set)",
    ),
    "tatoeba": Corpus(
        name="tatoeba",
        base_url="",
        mirror_dir="tatoeba_test_de_en",
        files=_table(_TATOEBA, lambda split, lang: f"tatoeba-test-{split}.{lang}.gz"),
        default_splits=("v2021-08-07",),
        description="Tatoeba de-en test sets, everyday sentences (mirror only: NMT_MIRROR must "
        "be set)",
    ),
}


@dataclass(frozen=True)
class HubCorpus:
    """A parallel corpus on the Hugging Face hub, rows holding a `translation` column
    ({lang: text}), as plain data (nmt.data.load_hub_split reads it with `datasets`).

    `path`, `config`, `revision` and `data_dir` are the arguments of `datasets.load_dataset`;
    `splits` and `langs` are checked before anything is fetched.
    """

    name: str
    path: str
    config: str | None
    langs: tuple[str, ...]
    splits: tuple[str, ...]
    revision: str | None = None
    data_dir: str | None = None
    description: str = field(default="", compare=False)


HUB_CORPORA: dict[str, HubCorpus] = {
    "wmt16": HubCorpus(
        name="wmt16",
        path="wmt/wmt16",  # the hub's old name "wmt16" redirects here
        config="de-en",
        langs=("de", "en"),
        splits=("train", "validation", "test"),
        description="WMT16 de-en training data (Europarl v7, Common Crawl, News Commentary "
        "v11): 4,548,885 pairs; validation newstest2015, test newstest2016",
    ),
    "wmt14": HubCorpus(
        name="wmt14",
        path="wmt/wmt14",
        config="de-en",
        langs=("de", "en"),
        splits=("train", "validation", "test"),
        description="WMT14 de-en training data (Europarl v7, Common Crawl, News Commentary v9): "
        "4,508,785 pairs; validation newstest2013, test newstest2014",
    ),
    "iwslt14": HubCorpus(
        name="iwslt14",
        # A community upload of IWSLT14 de-en. Its main branch holds a loading script, which
        # `datasets` no longer runs, so the hub's own parquet export of it is read instead.
        path="bbaaaa/iwslt14-de-en",
        config=None,
        revision="refs/convert/parquet",
        data_dir="de-en",
        langs=("de", "en"),
        splits=("train", "validation", "test"),
        description="IWSLT14 de-en TED talks (community upload, hub parquet export)",
    ),
}


def get_hub_corpus(name: str) -> HubCorpus:
    """The hub corpus called `name`; an unknown name is a UsageError listing the known ones."""
    if name not in HUB_CORPORA:
        raise UsageError(
            f"unknown hub corpus {name!r}{_did_you_mean(name, HUB_CORPORA)}; "
            f"hub corpora: {', '.join(sorted(HUB_CORPORA))}"
        )
    return HUB_CORPORA[name]


class _Retryable(Exception):
    """A transient failure (connection refused or reset, timeout, HTTP 5xx): try again."""


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def get_corpus(name: str) -> Corpus:
    """The corpus called `name`; an unknown name is a UsageError listing the known ones."""
    if name not in CORPORA:
        raise UsageError(
            f"unknown corpus {name!r}{_did_you_mean(name, CORPORA)}; "
            f"corpora: {', '.join(sorted(CORPORA))}"
        )
    return CORPORA[name]


def resolve_url(corpus: Corpus | str, relpath: str) -> str:
    """`<base><relpath>`, or with NMT_MIRROR=<dir> set, `<dir>/<mirror folder>/<relpath>`.

    The mirror may be a local folder (returned as an absolute path), a file:// URL or an
    http(s) URL.
    """
    corpus = get_corpus(corpus) if isinstance(corpus, str) else corpus
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror and not corpus.base_url:
        raise UsageError(
            f"{corpus.name}: these files have no public address; set {MIRROR_ENV} to a folder "
            f"holding {corpus.mirror_dir}/ (e.g. {MIRROR_ENV}=../shared/corpora)"
        )
    if not mirror:
        return corpus.base_url + relpath
    scheme = urllib.parse.urlsplit(mirror).scheme.lower()
    if scheme in ("http", "https", "file"):
        return f"{mirror.rstrip('/')}/{corpus.mirror_dir}/{relpath}"
    if len(scheme) > 1:  # one letter would be a Windows drive
        raise UsageError(
            f"{MIRROR_ENV}={mirror}: expected a folder, a file:// URL or an http(s) URL"
        )
    return str(Path(mirror).expanduser().resolve() / corpus.mirror_dir / relpath)


def default_cache_dir() -> Path:
    """Where test sets named like `wmt:newstest2014` are downloaded: $NMT_CACHE or ~/.cache/nmt."""
    return Path(os.environ.get(CACHE_ENV, "").strip() or "~/.cache/nmt").expanduser()


def _where(url: str) -> str:
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    return f"{url} ({MIRROR_ENV}={mirror})" if mirror else url


def _open(url: str, label: str, timeout: float):
    """A binary stream for `url` (http(s), file:// or a local path)."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        try:
            return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (scheme checked)
        except urllib.error.HTTPError as e:
            if e.code >= 500 or e.code == 429:
                raise _Retryable(f"HTTP {e.code} {e.reason}") from None
            what = "not found" if e.code == 404 else f"HTTP {e.code} {e.reason}"
            raise DownloadError(f"{label}: {what} at {_where(url)}") from None
        except urllib.error.URLError as e:
            reason = e.reason
            text = getattr(reason, "strerror", None) or str(reason)
            raise _Retryable(text.lower() if isinstance(reason, OSError) else text) from None
        except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
            raise _Retryable(str(e) or type(e).__name__) from None
    if scheme == "file":
        path = urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
    elif len(scheme) <= 1:
        path = url
    else:
        raise UsageError(f"{label}: unsupported address {url} (use http(s), file:// or a path)")
    try:
        return open(path, "rb")  # noqa: SIM115 (closed by the caller)
    except FileNotFoundError:
        raise DownloadError(f"{label}: not found at {_where(path)}") from None
    except OSError as e:
        raise NmtError(f"{label}: cannot read {path}: {e.strerror}") from None


def _remove(path: Path | str | None) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _is_verified(path: Path, spec: FileSpec) -> bool:
    """True if `path` exists with the expected size and sha256 (a cheap size check first)."""
    try:
        if path.stat().st_size != spec.size:
            return False
    except OSError:
        return False
    return _sha256(path) == spec.sha256


def _fetch_once(url: str, spec: FileSpec, dest: Path, label: str, timeout: float) -> None:
    """Stream `url` into `dest` atomically, renamed into place only once verified."""
    stream = _open(url, label, timeout)
    with stream, atomic_write(dest) as out:
        digest, size = hashlib.sha256(), 0
        try:
            while chunk := stream.read(_CHUNK):
                size += len(chunk)
                if size > spec.size:  # no point reading a wrong file to its end
                    break
                digest.update(chunk)
                out.write(chunk)
        except (TimeoutError, ConnectionError, http.client.HTTPException) as e:
            raise _Retryable(f"transfer interrupted: {e or type(e).__name__}") from None
        found = digest.hexdigest()
        if size != spec.size or found != spec.sha256:
            got = f"more than {spec.size}" if size > spec.size else str(size)
            raise DownloadError(
                f"{label}: checksum mismatch for {_where(url)}: expected sha256 {spec.sha256} "
                f"({spec.size} bytes), found {found if size <= spec.size else '?'} ({got} bytes)"
            )


def _fetch(url, spec, dest, label, retries: int, timeout: float, backoff: float) -> None:
    """`_fetch_once` with up to `retries` tries on transient failures, waiting backoff*2^k."""
    tries = max(1, retries)
    for attempt in range(1, tries + 1):
        try:
            _fetch_once(url, spec, dest, label, timeout)
            return
        except _Retryable as e:
            if attempt == tries:
                raise NmtError(
                    f"{label}: cannot download {_where(url)}: {e} "
                    f"({tries} tr{'y' if tries == 1 else 'ies'})"
                ) from None
            time.sleep(backoff * 2 ** (attempt - 1))


def _gunzip(src: Path, dest: Path) -> None:
    """Unpack `src` into `dest` atomically; a bad gzip is a DownloadError naming `src`."""
    try:
        with gzip.open(src, "rb") as f, atomic_write(dest) as out:
            shutil.copyfileobj(f, out, _CHUNK)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DownloadError(f"{src}: truncated or corrupt gzip file ({e})") from None


def _check_request(corpus: Corpus, langs: list[str], splits: list[str] | None) -> list[str]:
    """Validate langs and splits before touching the network; return the split names."""
    known = corpus.langs()
    if not langs:
        raise UsageError(f"{corpus.name}: no language given; languages: {', '.join(known)}")
    for lang in langs:
        if lang not in known:
            raise UsageError(
                f"{corpus.name}: unknown language {lang!r}{_did_you_mean(lang, known)}; "
                f"languages: {', '.join(known)}"
            )
    if len(set(langs)) != len(langs):
        raise UsageError(f"{corpus.name}: a language is repeated in {langs}")
    if corpus.directional and len(langs) != 2:
        raise UsageError(
            f"{corpus.name}: its test sets depend on the direction: give exactly two languages, "
            f"source first (e.g. en de), found {langs}"
        )
    names = corpus.split_names(langs)
    if splits is None:
        splits = [s for s in (corpus.default_splits or names) if s in names]
    for split in splits:
        key = corpus.split_key(split, langs)
        if key not in corpus.files:
            raise UsageError(
                f"{corpus.name}: unknown split {split!r}{_did_you_mean(split, names)}; "
                f"splits: {', '.join(names)}"
            )
        missing = [lang for lang in langs if lang not in corpus.files[key]]
        if missing:
            raise UsageError(
                f"{corpus.name}: split {split!r} has no {', '.join(missing)} file; "
                f"its languages: {', '.join(sorted(corpus.files[key]))}"
            )
    return list(splits)


def download(
    corpus_name: str,
    langs: list[str],
    out_dir: str | Path,
    splits: list[str] | None = None,
    retries: int = 3,
    timeout: float = 30,
    backoff: float = 1.0,
    quiet: bool = False,
) -> dict[str, dict[str, Path]]:
    """Fetch, verify and unpack `splits` x `langs` of a corpus into `out_dir`.

    Returns {split: {lang: path of the plain-text file}}. Idempotent: a verified existing file
    is not fetched again. `splits=None` takes the corpus's default splits.
    """
    corpus = get_corpus(corpus_name)
    langs = list(langs)
    splits = _check_request(corpus, langs, None if splits is None else list(splits))
    out_dir = Path(out_dir)
    result: dict[str, dict[str, Path]] = {}
    for split in splits:
        key = corpus.split_key(split, langs)
        for lang in langs:
            spec = corpus.files[key][lang]
            text_path = out_dir / f"{key}.{lang}"
            gz = spec.path.endswith(".gz")
            raw_path = text_path.with_name(text_path.name + ".gz") if gz else text_path
            raw_path.parent.mkdir(parents=True, exist_ok=True)
            label = spec.path.rsplit("/", 1)[-1]
            if _is_verified(raw_path, spec):
                status = "verified, kept"
            else:
                url = resolve_url(corpus, spec.path)
                _remove(text_path)  # a text file from an older download is stale now
                _fetch(url, spec, raw_path, label, retries, timeout, backoff)
                status = f"fetched from {url}"
            if gz and not text_path.exists():
                _gunzip(raw_path, text_path)
            if not quiet:
                print(f"{corpus.name} {split}.{lang}: {text_path} ({status})", file=sys.stderr)
            result.setdefault(split, {})[lang] = text_path
    return result


def split_files(
    corpus_name: str,
    split: str,
    src_lang: str,
    tgt_lang: str,
    out_dir: str | Path,
    retries: int = 3,
    timeout: float = 30,
    quiet: bool = False,
) -> tuple[Path, Path]:
    """(source text, target text) of one split, downloaded into `out_dir` if needed."""
    files = download(
        corpus_name, [src_lang, tgt_lang], out_dir, [split], retries, timeout, quiet=quiet
    )
    return files[split][src_lang], files[split][tgt_lang]


def resolve_testset(
    name: str, src_lang: str, tgt_lang: str, cache_dir: str | Path | None = None
) -> tuple[Path, Path]:
    """`corpus:split` (e.g. `multi30k:test_2016_flickr`, `wmt:newstest2014`) -> (src, ref).

    Downloads into `<cache_dir>/<corpus>/` ($NMT_CACHE or ~/.cache/nmt by default) if needed.
    """
    corpus_name, sep, split = name.partition(":")
    if not sep or not corpus_name or not split:
        raise UsageError(
            f"test set {name!r}: expected CORPUS:SPLIT, e.g. multi30k:test_2016_flickr or "
            f"wmt:newstest2014"
        )
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return split_files(corpus_name, split, src_lang, tgt_lang, root / corpus_name, quiet=True)

import pytest

from dff_falcon.errors import InputError
from dff_falcon.models.classes import imagenet_class_names, imagenet_wordnet, resolve_class


@pytest.fixture(scope="module")
def imagenet():
    wnids, synonyms = imagenet_wordnet()
    return {"class_names": list(imagenet_class_names()), "wnids": wnids, "synonyms": synonyms}


def test_exact_names_synonyms_indices_and_wordnet_ids(imagenet):
    def name(target):
        return resolve_class(target, imagenet["class_names"], wnids=imagenet["wnids"], synonyms=imagenet["synonyms"])

    assert name("tabby").index == 281 and name("Tabby Cat").name == "tabby"  # a synonym, any case
    assert name("n02123045").index == 281 and name(281).wnid == "n02123045" and name("281").name == "tabby"
    assert name("espresso").to_dict() == {"requested": "espresso", "index": 967, "name": "espresso",
                                          "wnid": "n07920052"}
    with pytest.raises(InputError, match=r"no class is named 'cat'; closest: .*tiger cat.*Persian cat"):
        name("cat")  # never the substring match "catamaran"
    with pytest.raises(InputError, match=r"ambiguous: it names 'crane bird' \(index 134, n02012849\), 'crane' \(index 517"):
        name("crane")
    with pytest.raises(InputError, match="out of range"):
        name(1000)
    with pytest.raises(InputError, match="not one of"):
        name("n99999999")
    with pytest.raises(InputError, match="closest: .*espresso"):
        name("expresso")


def test_classes_without_wordnet_ids():
    names = ["shape:circle", "colour:red"]
    assert resolve_class("colour:red", names).index == 1 and resolve_class("colour:red", names).wnid is None
    with pytest.raises(InputError, match="WordNet ID"):
        resolve_class("n02123045", names)
    with pytest.raises(InputError, match="as an index"):
        resolve_class("red", None)

"""Prepare local text / JSONL files as an array_record tfds dataset.

    python -m llamax.data.text_files --name mine --train a.txt b.jsonl \
        --validation c.txt --data_dir ~/tensorflow_datasets [--sft] [--split paragraph]

Read it back with `tfds.data_source("text_files/mine", split="train", data_dir=...)` or
`llamax.data.sources.open_documents("text_files/mine", "train", data_dir=...)`.
"""
import argparse

from llamax.data.text_files import build_text_dataset


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="config name: dataset is text_files/NAME")
    parser.add_argument("--train", nargs="+", required=True, help="files of the train split")
    parser.add_argument("--validation", nargs="*", default=[], help="files of the validation split")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--sft", action="store_true", help="SFT JSONL (prompt/response, messages)")
    parser.add_argument("--text_key", default="text")
    parser.add_argument("--split", default="file", choices=["file", "paragraph", "line"],
                        help="how plain-text files become documents")
    parser.add_argument("--on_error", default="raise", choices=["raise", "skip"])
    args = parser.parse_args(argv)
    builder = build_text_dataset(args.name, args.train, args.data_dir,
                                 validation_files=args.validation, sft=args.sft,
                                 text_key=args.text_key, split=args.split, on_error=args.on_error)
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    print(f"prepared text_files/{args.name} in {builder.data_dir}: {splits}")


if __name__ == "__main__":
    main()

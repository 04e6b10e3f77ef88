"""Print the training cost of each anchor of a bank, read from its manifest.

    python docs/bank_cost.py lamp2-movies
    python docs/bank_cost.py path/to/bank-folder

The figures are the ones `mta-local bank build` recorded while it trained (train_seconds,
train_tokens, n_trained per anchor). They depend on the machine and its load at that time.
"""

import sys

from mta_local.bank import open_bank


def main(name: str) -> None:
    manifest = open_bank(name, task="").manifest
    lora = manifest["lora"]
    print(f"bank {manifest['bank_id']}: epochs {lora['epochs']}, rank {lora['rank']}, max_tokens {lora['max_tokens']}, "
          f"build_seconds {manifest.get('build_seconds')}")
    print("user_id\tn_trained\ttrain_tokens\ttrain_seconds\tms_per_token")
    for anchor in manifest["anchors"]:
        per_token = 1000 * anchor["train_seconds"] / anchor["train_tokens"]
        print(f"{anchor['user_id']}\t{anchor['n_trained']}\t{anchor['train_tokens']}\t{anchor['train_seconds']}\t{per_token:.1f}")
    seconds = sum(anchor["train_seconds"] for anchor in manifest["anchors"])
    tokens = sum(anchor["train_tokens"] for anchor in manifest["anchors"])
    print(f"total\t{sum(a['n_trained'] for a in manifest['anchors'])}\t{tokens}\t{seconds:.2f}\t{1000 * seconds / tokens:.1f}")


if __name__ == "__main__":
    main(sys.argv[1])

"""A reward for the service tests, built by import path in the server's process: the dark fraction of each image,
NaN for a prompt containing "nan", an exception for one containing "crash", a pause for one containing "slow"."""

import time

import torch


class Judge:
    name = "judge"

    def __call__(self, images, prompts, targets):
        if any("crash" in p for p in prompts):
            raise RuntimeError("the judge crashed")
        if any("slow" in p for p in prompts):
            time.sleep(0.6)
        luma = 0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]
        scores = (luma < 0.5).float().flatten(1).mean(1)
        return torch.where(torch.tensor(["nan" in p for p in prompts]), torch.nan, scores)


def build_judge(term):
    return Judge()

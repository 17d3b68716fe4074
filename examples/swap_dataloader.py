"""Cyclical data in an existing PyTorch loop: swap the DataLoader, record the per-sample loss.

The whole change against a plain loop::

    -loader = DataLoader(train_set, batch_size=128, shuffle=True, num_workers=2)
    +loader = CyclicalLoader(train_set, epochs=EPOCHS, batch_size={"easy": 256, "hard": 64}, shuffle=True,
    +                        keep={"easy": 0.5, "hard": 1.0}, num_workers=2)
     ...
    -    loss = F.cross_entropy(model(images), labels)
    +    losses = F.cross_entropy(model(images), labels, reduction="none")
    +    loader.record_loss(losses.detach())
    +    loss = losses.mean()

Run: ``python examples/swap_dataloader.py`` (trains timm's test_resnet on the embedded MNIST, ~1 min on CPU).
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F

from cycdata.loaders import CyclicalLoader, load_dataset

EPOCHS = 6


def main() -> None:
    torch.manual_seed(0)
    data = load_dataset("mnist5k")
    mean, std = data.mean[0] * 255, data.std[0] * 255
    model = timm.create_model("test_resnet", num_classes=10, in_chans=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = CyclicalLoader(
        data.train, epochs=EPOCHS, batch_size={"easy": 256, "hard": 64}, keep={"easy": 0.5, "hard": 1.0}, shuffle=True
    )
    for epoch in range(EPOCHS):
        model.train()
        for images, labels in loader:
            losses = F.cross_entropy(model((images.float() - mean) / std), labels, reduction="none")
            loader.record_loss(losses.detach())
            optimizer.zero_grad()
            losses.mean().backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            images, labels = data.test.images, data.test.labels
            accuracy = (model((images.float() - mean) / std).argmax(1) == labels).float().mean().item()
        knobs = loader.knobs  # what the epoch just run did (len(loader) too, until the next pass begins)
        print(
            f"epoch {epoch + 1}/{EPOCHS}  test accuracy {accuracy:.3f}  batch {knobs['data.batch_size']}, "
            f"{knobs['self_paced.kept']} samples kept, {len(loader)} steps"
        )


if __name__ == "__main__":
    main()

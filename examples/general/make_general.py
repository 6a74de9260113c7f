"""Make the general text sets that ship with tuneforge (written for this project, CC0).

* ``general_text.jsonl`` - plain paragraphs ({"text": ...}) on everyday subjects. ``tuneforge
  eval`` measures perplexity on them for base and fine-tuned model: a rise means the fine-tuned
  model lost some general language modelling (forgetting).
* ``general_instructions.jsonl`` - short general questions with answers ({"instruction",
  "output"}), for mixing into training data against forgetting. No question is about a subject
  of the paragraphs above, so mixing them in cannot teach the measured text itself.

Every sentence below was written by hand for tuneforge and is dedicated to the public domain
(CC0 1.0), so the files may be redistributed freely. Deterministic: rerunning rewrites the same
files. ``python examples/general/make_general.py``
"""

import json
from pathlib import Path

PARAGRAPHS = [
    "Water moves through the world in a cycle. The sun warms oceans, lakes and rivers, and some "
    "of the water rises into the air as vapour. High above the ground the air is colder, so the "
    "vapour condenses into tiny droplets that gather as clouds. When the droplets grow heavy "
    "enough they fall as rain or snow, and the water runs back into rivers, soaks into the soil "
    "or is stored for a while in glaciers before the cycle begins again.",
    "Bread is made from flour, water, salt and yeast. When the ingredients are mixed and "
    "kneaded, proteins in the flour form a stretchy network called gluten. The yeast feeds on "
    "sugars in the dough and releases carbon dioxide, which is trapped by the gluten and makes "
    "the dough rise. In the oven the gas expands, the yeast dies, and the outside of the loaf "
    "browns into a crust while the inside sets into a soft crumb.",
    "A library is more than a room full of books. Most public libraries lend films, music and "
    "e-books, offer free access to computers, and run reading groups for children and adults. "
    "Librarians help visitors find reliable information, whether they are looking for a job, "
    "tracing their family history or trying to understand a letter from the council. For many "
    "people the library is one of the few warm, quiet places they can stay without paying.",
    "Bicycles are one of the most efficient machines people have built. A rider on a bicycle "
    "uses less energy to travel a kilometre than a person walking, because the wheels roll "
    "with little friction and the gears let the legs work at a comfortable pace. In many "
    "cities, separate cycle lanes have made riding safer, and more people now cycle to work, "
    "to school and to the shops.",
    "Bees and many other insects carry pollen from flower to flower while they feed on nectar. "
    "This pollination allows plants to form seeds and fruit. Apples, almonds, strawberries and "
    "many other crops depend on it. Gardeners can help pollinators by growing a variety of "
    "flowers that bloom at different times of the year and by avoiding sprays that harm "
    "insects.",
    "The printing press changed how ideas spread. Before it, books were copied by hand, which "
    "made them slow to produce and expensive to own. With movable type, a printer could make "
    "hundreds of identical pages in the time a scribe needed for one. Pamphlets, newspapers "
    "and cheap books followed, and reading became common among people who had never owned a "
    "book before.",
    "A good night's sleep helps the body and the mind. During sleep the brain sorts the "
    "memories of the day, and the body repairs muscles and other tissues. Most adults need "
    "seven to nine hours a night. Going to bed at the same time each evening, keeping the "
    "bedroom dark and cool, and putting screens away an hour before bed all make it easier "
    "to fall asleep.",
    "Maps turn the round surface of the earth into a flat picture, and no flat map can do that "
    "without distortion. Some projections keep the shapes of countries correct but stretch "
    "their sizes near the poles; others keep areas correct but bend the shapes. The choice "
    "depends on the purpose: sailors wanted straight compass lines, while a map of population "
    "needs honest areas.",
    "Composting turns kitchen scraps and garden waste into rich soil. Bacteria, fungi and worms "
    "break down vegetable peelings, leaves and grass cuttings over a few months. A good compost "
    "heap mixes wet green material with dry brown material such as cardboard or straw, and it "
    "needs air, so it should be turned now and then. The finished compost is dark, crumbly and "
    "smells of the forest floor.",
    "The moon has no light of its own; it shines because it reflects sunlight. As it travels "
    "around the earth about once a month, we see different parts of its sunlit side, which is "
    "why it seems to change shape from a thin crescent to a full disc and back again. The "
    "moon's gravity also pulls on the oceans and, together with the sun, causes the tides.",
    "Learning a musical instrument takes patience. Beginners often practise scales and simple "
    "tunes for weeks before a piece sounds the way they hope. Short daily practice works better "
    "than one long session a week, because the hands and the ear learn through repetition. "
    "Playing with other people, even badly at first, is one of the quickest ways to improve "
    "and one of the most enjoyable.",
    "Electric current flows when charges move through a conductor such as a copper wire. The "
    "voltage of a battery pushes the charges, and the resistance of the circuit holds them "
    "back. A light bulb glows because its thin filament resists the current and heats up, "
    "while modern lamps use light-emitting diodes, which turn more of the energy into light "
    "and less into heat.",
    "Markets have been at the centre of towns for centuries. Farmers bring vegetables, cheese "
    "and eggs; bakers sell bread that was made before dawn; and traders call out prices to the "
    "people passing by. Buying food at a market often means fewer packages and a chance to ask "
    "the grower how something was produced or how best to cook it.",
    "Volcanoes form where molten rock from deep inside the earth reaches the surface. Some "
    "erupt explosively, throwing ash high into the sky, while others release slow rivers of "
    "lava. Over time the cooled rock builds mountains and even whole islands. The soil around "
    "many volcanoes is very fertile, which is one reason people have farmed on their slopes "
    "despite the danger.",
    "Writing a clear letter starts with knowing what you want the reader to do. Put the main "
    "point in the first few lines, give the facts the reader needs, and end with the next step "
    "you expect. Short sentences and plain words are easier to follow than long, formal "
    "phrases. Reading the letter aloud before sending it is a simple way to catch mistakes.",
    "Trees take in carbon dioxide from the air and, using the energy of sunlight, turn it into "
    "sugar and wood. This process, photosynthesis, also releases oxygen. A single large tree "
    "can hold several tonnes of carbon in its trunk, branches and roots. Forests also shade "
    "the ground, slow down rainwater and give shelter to birds, insects and mammals.",
    "Chess is played on a board of sixty-four squares with sixteen pieces for each player. "
    "Each kind of piece moves in its own way: the rook along straight lines, the bishop along "
    "diagonals, and the knight in an L shape that lets it jump over others. The aim is to "
    "trap the opponent's king so that it cannot escape, a position called checkmate.",
    "Washing hands with soap is one of the simplest ways to stop illness from spreading. Soap "
    "breaks apart the oily layer that surrounds many germs and lifts dirt from the skin so that "
    "water can rinse it away. Doctors recommend scrubbing for about twenty seconds, including "
    "between the fingers and under the nails, and drying the hands with a clean towel.",
    "Railways made long journeys faster and cheaper in the nineteenth century. Goods that had "
    "travelled for weeks by cart or canal could cross a country in a day or two. Towns grew up "
    "around stations, and the need for shared timetables led railways to adopt standard time "
    "across whole regions, replacing the local times that each town had kept by the sun.",
    "A budget is a plan for money. Writing down what comes in each month and what goes out "
    "shows where the money actually goes, which often surprises people. Regular costs such as "
    "rent and bills come first, then food and transport, and whatever is left can be split "
    "between savings and treats. Even a small amount saved every month adds up over a year.",
    "Rainbows appear when sunlight shines through drops of rain. Each drop bends the light as "
    "it enters, reflects it off the back of the drop, and bends it again as it leaves. Because "
    "different colours bend by slightly different amounts, the white light spreads into a band "
    "of red, orange, yellow, green, blue and violet. To see a rainbow, stand with the sun "
    "behind you.",
    "Languages change all the time. New words are borrowed from other languages or invented "
    "for new things, while old words drift in meaning or fall out of use. Pronunciation shifts "
    "slowly from one generation to the next, which is why the spelling of many English words "
    "no longer matches the way they are said. Grammar changes too, though more slowly.",
    "Keeping a small vegetable garden can be done on a balcony. Tomatoes, beans, lettuce and "
    "herbs grow well in pots if they get at least six hours of sun and regular watering. A pot "
    "needs holes in the bottom so that extra water can drain, and a layer of mulch on top keeps "
    "the soil from drying out on hot days.",
    "Glass is made by melting sand with soda and lime at very high temperatures. While it is "
    "hot and soft, the glass can be blown into bottles, pressed into shapes or floated on a bath "
    "of molten tin to make the flat sheets used in windows. As it cools slowly, it becomes hard "
    "and clear. Old glass can be crushed and melted again, which saves energy.",
    "Museums keep objects that tell the story of people and the natural world: tools, "
    "paintings, fossils, clothes and machines. Curators decide what to collect and how to "
    "display it, and conservators repair damage and protect fragile items from light and damp. "
    "Many museums now put photographs of their collections online so that anyone can study "
    "them from home.",
    "Running a first marathon takes months of preparation. Training plans usually increase the "
    "longest weekly run a little at a time, with easy days in between so that the body can "
    "recover. Good shoes, enough water and a steady pace matter more than speed. On the day "
    "itself, many first-time runners find that the crowd along the route carries them through "
    "the hardest kilometres.",
    "Clouds come in many shapes. Cumulus clouds are the puffy white heaps of a fine summer day. "
    "Stratus clouds form flat grey layers that can bring drizzle. Cirrus clouds are thin wisps "
    "of ice crystals high in the sky, and towering cumulonimbus clouds bring thunderstorms, "
    "heavy rain and sometimes hail. Watching the clouds is one of the oldest ways of guessing "
    "the weather.",
    "A recipe is a set of instructions, and like any instructions it works best when read all "
    "the way through before starting. Measuring the ingredients in advance, heating the oven "
    "early and clearing space on the counter make cooking calmer. Tasting as you go, and "
    "adjusting the salt or acid at the end, is how cooks turn a plain dish into a good one.",
    "Lighthouses once guided ships past rocks and into harbours with a bright lamp and a "
    "pattern of flashes that told sailors which lighthouse they were looking at. Keepers lived "
    "beside the light, cleaned the lenses and kept the lamp burning through storms. Today most "
    "lighthouses run automatically, and satellite navigation has taken over much of their work.",
    "Recycling paper saves trees, water and energy. Used paper is soaked and stirred into a "
    "pulp, cleaned of ink and staples, and pressed into new sheets. Each time paper is recycled "
    "its fibres get shorter, so it can only be reused a handful of times before it becomes too "
    "weak. Keeping paper dry and free of food makes it much easier to recycle.",
]

QUESTIONS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are there in a leap year?", "A leap year has 366 days."),
    ("Name three primary colours of paint.", "Red, yellow and blue."),
    ("What is 12 multiplied by 8?", "12 multiplied by 8 is 96."),
    ("Give a synonym for 'happy'.", "A synonym for 'happy' is 'cheerful'."),
    ("Which planet is closest to the sun?", "Mercury is the planet closest to the sun."),
    ("Translate 'thank you' into Spanish.", "'Thank you' in Spanish is 'gracias'."),
    ("What is the boiling point of water at sea level in Celsius?", "It is 100 degrees Celsius."),
    (
        "Write a one-sentence greeting for a birthday card.",
        "Wishing you a wonderful birthday "
        "filled with laughter, good friends and everything that makes you happy!",
    ),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("Suggest a name for a pet goldfish.", "How about 'Bubbles'?"),
    ("What is the opposite of 'ancient'?", "The opposite of 'ancient' is 'modern'."),
    ("List the four seasons of the year.", "Spring, summer, autumn and winter."),
    (
        "Why do we wear coats in winter?",
        "Coats trap a layer of warm air around the body, which "
        "keeps us from losing heat in cold weather.",
    ),
    ("What is the plural of 'mouse'?", "The plural of 'mouse' is 'mice'."),
    (
        "Explain what a noun is in one sentence.",
        "A noun is a word that names a person, place, "
        "thing or idea, such as 'teacher', 'city' or 'kindness'.",
    ),
    ("What is 15 percent of 200?", "15 percent of 200 is 30."),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest ocean."),
    (
        "Give two tips for staying focused while studying.",
        "Put your phone in another room, and "
        "work in short blocks of about 25 minutes with a short break after each.",
    ),
    ("How many minutes are in three hours?", "There are 180 minutes in three hours."),
    ("What gas do humans need to breathe?", "Humans need oxygen to breathe."),
    ("Rewrite this sentence in the past tense: I walk to school.", "I walked to school."),
    ("Who wrote 'Romeo and Juliet'?", "William Shakespeare wrote 'Romeo and Juliet'."),
    (
        "What is the freezing point of water in Fahrenheit?",
        "Water freezes at 32 degrees Fahrenheit.",
    ),
    ("Name a mammal that can fly.", "The bat is a mammal that can fly."),
    (
        "Write a short, polite way to decline an invitation.",
        "Thank you so much for inviting me; "
        "I'm sorry I can't make it this time, but I hope you have a lovely evening.",
    ),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("Which instrument has 88 keys?", "A standard piano has 88 keys."),
    ("What do bees make?", "Bees make honey and beeswax."),
    ("How many continents are there?", "There are seven continents."),
    ("Give an example of a renewable energy source.", "Wind power is a renewable energy source."),
    ("What is the main ingredient of guacamole?", "The main ingredient of guacamole is avocado."),
    (
        "Summarise in one sentence why exercise is good for you.",
        "Regular exercise strengthens the "
        "heart and muscles, improves mood and helps you sleep better.",
    ),
    ("What is 100 divided by 4?", "100 divided by 4 is 25."),
    ("What colour do you get by mixing blue and yellow?", "Mixing blue and yellow gives green."),
    ("Name the longest river in Africa.", "The Nile is the longest river in Africa."),
    (
        "What is a haiku?",
        "A haiku is a short Japanese poem of three lines with five, seven and five syllables.",
    ),
    ("How many sides does a hexagon have?", "A hexagon has six sides."),
    (
        "Recommend a simple breakfast that is quick to make.",
        "Porridge with sliced banana is "
        "quick: cook oats in milk for a few minutes and add the fruit on top.",
    ),
]


def main() -> None:
    here = Path(__file__).parent
    with open(here / "general_text.jsonl", "w") as f:
        for p in PARAGRAPHS:
            f.write(json.dumps({"text": p}) + "\n")
    with open(here / "general_instructions.jsonl", "w") as f:
        for q, a in QUESTIONS:
            f.write(json.dumps({"instruction": q, "output": a}) + "\n")


if __name__ == "__main__":
    main()
